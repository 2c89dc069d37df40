"""User-facing errors and the wrapper that turns them into one clear line instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (bad params, bad data, no network); printed without a traceback."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a UserError (or ParamsError) exits with status 2 and its message only."""
    from ftstudy.params import ParamsError

    try:
        main()
    except (UserError, ParamsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
