"""Seconds per phase of a stage, so its cost at another size can be estimated from what it measured."""

from __future__ import annotations

import time


class Clock:
    """Seconds per phase, each lap from the end of the one before."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 2)
        self._t = now
