"""How the service waits: for its next tick, a signal, or a config file to settle.

Signals only wake the loop (a self-pipe written by the C-level handler); the loop waits on
that pipe with a timeout until the next tick is due, so a signal cuts the sleep short and
every state change happens on the loop's thread. A virtual waiter jumps a virtual clock
instead of sleeping (simulations and tests).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

from governor.clock import Clock, VirtualClock

RELOAD = "reload"
STOP = "stop"

RELOAD_SETTLE_S = 0.5
"""A reloaded config must have stayed unchanged this long (seconds) before it is read."""
RELOAD_SETTLE_MAX_S = 5.0
"""The longest a reload waits for a file that keeps changing (seconds)."""


class Waiter(Protocol):
    """How the loop waits for its next tick or an event."""

    def put(self, event: str) -> None:
        """Queue an event (safe from a signal handler)."""
        ...

    def wait(self, deadline_s: float) -> list[str]:
        """Block until ``deadline_s`` on the clock or until an event arrives; return the events."""
        ...


class PipeWaiter:
    """Real waiting on a self-pipe: signals and requests from other threads wake the loop.

    ``signal.set_wakeup_fd`` makes the C-level signal handler write the signal number
    into the pipe the moment a signal arrives, so ``select`` returns at once; the
    Python-level handlers do nothing at all. Events are read back from the bytes in the
    pipe, so nothing depends on when Python runs its handlers. Other threads ask for a
    reload or a stop by writing the same bytes.
    """

    CODES: ClassVar[dict[int, str]] = {signal.SIGHUP: RELOAD, signal.SIGTERM: STOP, signal.SIGINT: STOP}
    BYTES: ClassVar[dict[str, bytes]] = {RELOAD: bytes([signal.SIGHUP]), STOP: bytes([signal.SIGTERM])}

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._installed = False
        self._closed = False
        self._lock = threading.Lock()  # put() from other threads never races close()

    def install_signal_handlers(self) -> None:
        """Route SIGHUP, SIGTERM and SIGINT into the pipe (main thread only)."""
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._installed = True
        for signum in self.CODES:
            signal.signal(signum, _ignore_signal)

    def put(self, event: str) -> None:
        """Queue an event (from any thread); a no-op once the loop has ended and closed the pipe."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # a full pipe already holds a wake-up
                os.write(self._write_fd, self.BYTES[event])

    def wait(self, deadline_s: float) -> list[str]:
        """Wait for the deadline or the first event, then return every event queued."""
        timeout = max(0.0, deadline_s - self._clock.monotonic())
        readable, _, _ = select.select([self._read_fd], [], [], timeout)
        events: list[str] = []
        if readable:
            while True:
                try:
                    data = os.read(self._read_fd, 512)
                except BlockingIOError:
                    break
                if not data:
                    break
                events.extend(self.CODES[b] for b in data if b in self.CODES)
        return events

    def close(self) -> None:
        """Close the pipe (after the loop ended); signals stop writing to it first."""
        if self._installed:
            with contextlib.suppress(ValueError):  # only the main thread may do this
                signal.set_wakeup_fd(-1)
            self._installed = False
        with self._lock:
            self._closed = True
            for fd in (self._read_fd, self._write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _ignore_signal(signum: int, frame: object) -> None:
    """The Python-level handler: nothing to do, the wake-up fd carried the signal."""


class VirtualWaiter:
    """Virtual waiting: jump the virtual clock to the deadline unless an event is queued."""

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._events: list[str] = []

    def put(self, event: str) -> None:
        """Queue an event."""
        self._events.append(event)

    def wait(self, deadline_s: float) -> list[str]:
        """Return queued events at once, else advance the clock to the deadline."""
        if self._events:
            events, self._events = self._events, []
            return events
        self._clock.advance_to(deadline_s)
        return []


def wait_pinging(
    waiter: Waiter, clock: Clock, deadline_s: float, ping: Callable[[], None], ping_every_s: float | None
) -> list[str]:
    """The events that came before ``deadline_s`` (monotonic seconds; empty: none came), calling
    ``ping`` every ``ping_every_s`` seconds meanwhile (None: never). A poll interval longer than
    half systemd's WatchdogSec= (up to 3600 s is valid) must not look like a hang: the wait wakes
    to ping between ticks, while a stuck tick, which never waits, still pings nothing."""
    while ping_every_s is not None and deadline_s - clock.monotonic() > ping_every_s:
        events = waiter.wait(clock.monotonic() + ping_every_s)
        if events:
            return events
        ping()
    return waiter.wait(deadline_s)


def settle(
    path: Path,
    clock: Clock,
    waiter: Waiter,
    settle_s: float = RELOAD_SETTLE_S,
    max_s: float = RELOAD_SETTLE_MAX_S,
    log: Any = None,
) -> bool:
    """Wait until ``path`` has stayed unchanged (inode, size, mtime) for ``settle_s`` seconds.

    A reload that reads a file while its writer is still writing it would apply a torn
    file; a file last changed longer ago than the settle time is read at once. Waits at
    most ``max_s`` seconds (then logs ``config_still_changing`` on ``log``) and reads
    what is there (validation judges it). The wait is on the waiter, so SIGTERM cuts it
    short: False means a stop was queued (it is queued again for the loop). A SIGHUP that
    arrives meanwhile is queued again too, when the wait ends: whoever sent it gets a reload
    that began after it (``gpu-governor reload``, systemd's notify-reload), not this one.
    """
    if settle_s <= 0:
        return True

    def identity() -> tuple[int, int, int] | None:
        try:
            info = os.stat(path)
        except OSError:
            return None  # the read reports it
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    seen = identity()
    if seen is None or time.time() - seen[2] / 1e9 >= settle_s:
        return True
    begin = quiet_since = clock.monotonic()
    again = False  # a SIGHUP came while waiting
    while True:
        now = clock.monotonic()
        settled = now - quiet_since >= settle_s
        if settled or now - begin >= max_s:
            if not settled and log is not None:
                log.warning("config_still_changing", config=str(path), waited_s=round(now - begin, 3))
            if again:
                waiter.put(RELOAD)
            return True
        events = waiter.wait(now + min(0.1, settle_s))
        if STOP in events:
            waiter.put(STOP)
            return False
        again = again or RELOAD in events
        current = identity()
        if current != seen:
            seen, quiet_since = current, clock.monotonic()
