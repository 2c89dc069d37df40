"""Reaching the Hugging Face Hub: fail fast and clearly when it cannot be reached.

The token, when needed (gemma-3-1b-it is gated), is read by huggingface_hub from HF_TOKEN in the
environment; this project never passes it around, logs it or writes it anywhere.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlparse

from ftstudy.errors import UserError
from ftstudy.params import EMBEDDED_HINT

PROBE_SECONDS = 5.0


class HubUnavailable(UserError):
    pass


def _connect(host: str, port: int) -> None:
    socket.create_connection((host, port), timeout=PROBE_SECONDS).close()


def require_hub(what: str) -> None:
    """Raise HubUnavailable within ~PROBE_SECONDS when the hub is off-limits or unreachable.

    huggingface_hub itself retries with long timeouts; probing first turns "hangs for minutes" into one
    message. DNS lookups ignore socket timeouts, so the probe runs in a thread with its own deadline.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubUnavailable(f"{what} needs the Hugging Face Hub, but HF_HUB_OFFLINE is set. {EMBEDDED_HINT}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(_connect, host, port).result(timeout=PROBE_SECONDS + 1)
    except (OSError, FutureTimeout) as err:
        reason = "timed out" if isinstance(err, FutureTimeout) else f"{type(err).__name__}: {err}"
        raise HubUnavailable(
            f"{what} needs the Hugging Face Hub, but {host}:{port} cannot be reached ({reason}). {EMBEDDED_HINT}"
        ) from None
    finally:
        pool.shutdown(wait=False)
