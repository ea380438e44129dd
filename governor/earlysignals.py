"""Signals held from the first instant of ``run``: queued, never fatal.

A SIGHUP or SIGTERM that arrives while the daemon is still importing and starting would
otherwise meet the default action and kill it (a SIGHUP 0.15 s after launch did). ``run``
blocks them at the very start of the process (before the heavy imports) and releases
them once the daemon's waiter has its handlers in place: anything that arrived in
between is then delivered to the waiter and handled by the loop like any other signal.
Once the run is over (the limits restored), a process started for it ignores them: a second
SIGTERM arriving while the interpreter winds down would otherwise turn exit 0 into death by
signal (``after_run``). Imports nothing but the standard library, so it can run before
everything else.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

HELD = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
"""The signals the daemon handles: reload, stop, stop."""
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
"""A signal's handler as ``signal.getsignal`` gives it and ``signal.signal`` takes it."""
_whole_process = False  # the process exists for this one command (console_main): nothing follows the run


def hold_for_run(argv: Sequence[str]) -> bool:
    """Block HELD in this thread when ``argv`` (without the program name) starts ``run``;
    True when it did."""
    if list(argv[:1]) != ["run"]:
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    return True


def release() -> None:
    """Unblock HELD: signals that arrived while held are delivered now, to the handlers in place."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


def after_run(previous: Handler) -> Handler:
    """The handler to put back for a HELD signal once the run is over: ``previous``, unless the whole
    process was started for the run (:func:`console_main`); then SIG_IGN, so a late SIGTERM or SIGINT
    cannot kill the process that already stopped cleanly."""
    return signal.SIG_IGN if _whole_process else previous


def console_main() -> int:
    """The ``gpu-governor`` command: hold the signals for ``run``, then import and run the CLI.

    The console script points here rather than at ``governor.cli:main``, so that the
    signals are held before the CLI's imports (0.1-0.3 s) instead of after them.
    """
    import sys

    global _whole_process  # noqa: PLW0603 (set once, before anything else runs)
    _whole_process = hold_for_run(sys.argv[1:])
    from governor.cli import main

    return main()
