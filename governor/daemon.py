"""The daemon as other modules know it: :class:`governor.service.Service` and its parts.

The loop, schedule and signals live in governor.service, the waiting in governor.waiting,
the decide-and-act step in governor.core and everything that reports on it in
governor.observers; these names stay importable from here.
"""

from __future__ import annotations

from governor.core import check_state_dirs, memory_only_originals
from governor.observers import EVENT_NAMES, PROCESS_ACTION_NAMES
from governor.service import Service
from governor.waiting import RELOAD, RELOAD_SETTLE_MAX_S, RELOAD_SETTLE_S, STOP, PipeWaiter, VirtualWaiter, Waiter

Daemon = Service
"""The service under its old name."""

__all__ = [
    "EVENT_NAMES",
    "PROCESS_ACTION_NAMES",
    "RELOAD",
    "RELOAD_SETTLE_MAX_S",
    "RELOAD_SETTLE_S",
    "STOP",
    "Daemon",
    "PipeWaiter",
    "Service",
    "VirtualWaiter",
    "Waiter",
    "check_state_dirs",
    "memory_only_originals",
]
