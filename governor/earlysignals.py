"""Signals held from the first instant of ``run``: queued, never fatal.

A SIGHUP or SIGTERM that arrives while the daemon is still importing and starting would
otherwise meet the default action and kill it (a SIGHUP 0.15 s after launch did). ``run``
blocks them at the very start of the process (before the heavy imports) and releases
them once the daemon's waiter has its handlers in place: anything that arrived in
between is then delivered to the waiter and handled by the loop like any other signal.
Imports nothing but the standard library, so it can run before everything else.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

HELD = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
"""The signals the daemon handles: reload, stop, stop."""


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


def console_main() -> int:
    """The ``gpu-governor`` command: hold the signals for ``run``, then import and run the CLI.

    The console script points here rather than at ``governor.cli:main``, so that the
    signals are held before the CLI's imports (0.1-0.3 s) instead of after them.
    """
    import sys

    hold_for_run(sys.argv[1:])
    from governor.cli import main

    return main()
