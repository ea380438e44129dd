"""Gaps in the readings (pure): time nobody read is no evidence.

A rule that waits for a run of readings (the ladder's hot readings and its cool dwell, the fans'
settle and follow times, a stopped unit's clear time) starts the run over at the first reading
after a gap longer than :func:`max_gap_s` (a frozen or stalled daemon, a driver call that hung, a GPU
lost and back, NVML failing every tick; in snapshot time, so a suspend, during which the daemon's
CLOCK_MONOTONIC stops, is no gap): the readings on either side of it are not consecutive, and what the card
did in between is not known. Target mode does the same for its run of headroom with its fit's fixed
:data:`governor.rules.fit.MAX_GAP_S` (15 s, this module's floor).
"""

from __future__ import annotations

GAP_POLLS = 3
"""Polls that may pass without a reading before a run starts over."""
MIN_GAP_S = 15.0
"""The shortest gap (s) that starts a run over, however fast the poll."""


def max_gap_s(poll_interval_s: float) -> float:
    """The longest time (s) between two readings of one run, for a daemon that polls every
    ``poll_interval_s`` seconds: :data:`GAP_POLLS` polls, and at least :data:`MIN_GAP_S`."""
    return max(GAP_POLLS * poll_interval_s, MIN_GAP_S)


DEFAULT_MAX_GAP_S = max_gap_s(1.0)
"""The gap limit (s) at the config's default poll interval (1 s)."""


def after_gap(last_s: float | None, t_s: float, limit_s: float) -> bool:
    """True when more than ``limit_s`` seconds passed between ``last_s``, a run's last reading
    (None: no run to break), and ``t_s``, this one's (both snapshot times, s)."""
    return last_s is not None and t_s - last_s > limit_s
