"""Clocks: the real one for the daemon, a virtual one for simulations and tests.

Both give monotonic seconds (``monotonic()``) for rules and scheduling and Unix
seconds (``wall()``) for humans. Only the daemon waits on a clock.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch."""
        ...


class RealClock:
    """The machine's clocks."""

    def monotonic(self) -> float:
        """time.monotonic()."""
        return time.monotonic()

    def wall(self) -> float:
        """time.time()."""
        return time.time()


class VirtualClock:
    """A clock that only moves when told to: simulations run as fast as the CPU allows."""

    def __init__(self, start_s: float = 0.0, wall_start_s: float = 1_700_000_000.0) -> None:
        self._now_s = start_s
        self._wall_offset_s = wall_start_s - start_s

    def monotonic(self) -> float:
        """Virtual seconds."""
        return self._now_s

    def wall(self) -> float:
        """Virtual Unix seconds (a fixed epoch plus virtual time)."""
        return self._now_s + self._wall_offset_s

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (>= 0)."""
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self._now_s += seconds

    def advance_to(self, t_s: float) -> None:
        """Move time forward to ``t_s`` if it lies ahead."""
        self._now_s = max(self._now_s, t_s)
