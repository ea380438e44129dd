"""Which gpu-governor process uses a state directory now: an advisory lock file in it.

``<state_dir>/governor.lock`` is locked (``flock``, exclusive) by the daemon (``gpu-governor
run``) from before it reads its state files until it exits, however it exits: the kernel
drops the lock with the process's last descriptor, so a daemon killed with SIGKILL or by
the watchdog holds nothing, and no stale PID file can ever block anyone. ``gpu-governor
restore`` takes the same lock without waiting: while a daemon holds it, that daemon governs
the GPUs and restores them itself when it stops, so the restore refuses
(:class:`~governor.errors.StateDirBusy`, exit 10). A daemon that finds the lock taken (a
restore running, another daemon on the same state directory) waits up to
:data:`DAEMON_WAIT_S` for it, then refuses to start the same way.

The file is opened without following a symbolic link and must be a regular file; the
holder writes its PID into it, which is read back only to name the holder in messages
(the lock itself, not the file's content, decides). The file is never deleted: deleting a
lock file lets two processes lock two different files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governor.clock import Clock
from governor.errors import StateDirBusy
from governor.waiting import RELOAD, STOP, Waiter

if TYPE_CHECKING:
    from governor.config import Config

LOCK_FILE_NAME = "governor.lock"
DAEMON_WAIT_S = 60.0
"""How long a starting daemon waits for a state directory another process holds (s): a restore on a
many-GPU host (NVML start-up, a few calls per GPU) ends well within it."""
POLL_S = 0.2
"""How often a waiting daemon tries the lock again (s)."""
MAX_PID_BYTES = 32


class StateLock:
    """The held lock of one state directory; :meth:`release` (or the process's exit) lets it go."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """True until released."""
        return self._fd is not None

    def release(self) -> None:
        """Unlock and close (idempotent)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def lock_path(state_dir: Path | str) -> Path:
    """The lock file of ``state_dir``."""
    return Path(state_dir) / LOCK_FILE_NAME


def try_lock(state_dir: Path | str, *, create_dir: bool = False) -> StateLock:
    """Take the lock of ``state_dir`` without waiting.

    Raises :class:`StateDirBusy` (naming the holder's PID when it wrote one) while another process
    holds it, and OSError when the lock file cannot be opened (no such directory, unless
    ``create_dir`` makes it, mode 0700 as the state files do; no permission; a symbolic link; not a
    regular file).
    """
    path = lock_path(state_dir)
    if create_dir:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path}: a symbolic link, which is not followed") from None
        if exc.errno == errno.ENXIO:
            raise OSError(errno.ENXIO, f"{path}: a FIFO, not a regular file") from None
        raise OSError(exc.errno, f"{path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path}: not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            who = "another gpu-governor process" if pid is None else f"gpu-governor process {pid}"
            raise StateDirBusy(path, pid, f"held by {who}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except BaseException:
        os.close(fd)
        raise
    return StateLock(path, fd)


def _holder_pid(fd: int) -> int | None:
    """The PID the holder wrote into the lock file, or None (not written yet, or not a PID)."""
    try:
        text = os.pread(fd, MAX_PID_BYTES, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and 0 < len(text) <= 10 else None


def lock_for_daemon(
    state_dir: Path | str,
    waiter: Waiter,
    clock: Clock,
    on_wait: Callable[[StateDirBusy], None],
    wait_s: float = DAEMON_WAIT_S,
) -> StateLock | None:
    """The daemon's lock on ``state_dir`` (created when missing), waited for up to ``wait_s`` seconds
    while another process holds it (``on_wait`` is told once, when the wait begins).

    None when a stop (SIGTERM, SIGINT) arrived while waiting; :class:`StateDirBusy` when the lock
    is still held after ``wait_s``; OSError when it cannot be taken at all (the caller decides).
    """
    deadline = clock.monotonic() + wait_s
    told = reload = False
    try:
        while True:
            try:
                return try_lock(state_dir, create_dir=True)
            except StateDirBusy as busy:
                if clock.monotonic() >= deadline:
                    raise StateDirBusy(busy.path, busy.holder_pid, f"{busy.why} for more than {wait_s:g} s") from None
                if not told:
                    on_wait(busy)
                    told = True
            events = waiter.wait(min(deadline, clock.monotonic() + POLL_S))
            if STOP in events:
                return None
            reload = reload or RELOAD in events
    finally:
        if reload:
            waiter.put(RELOAD)  # a SIGHUP while waiting is not lost: the loop reloads once running


@dataclass
class DaemonHold:
    """What a starting daemon got: the lock (None: none taken, see :func:`hold_for_daemon`), or
    ``stopped`` when a stop arrived while it waited. A context manager releasing the lock."""

    lock: StateLock | None = None
    stopped: bool = False

    def release(self) -> None:
        """Let the lock go (idempotent)."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> DaemonHold:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def hold_for_daemon(
    config: Config, waiter: Waiter, clock: Clock, log: Any, wait_s: float = DAEMON_WAIT_S
) -> DaemonHold:
    """The state directory of ``config``, held for a daemon before it opens anything.

    No lock for a run that keeps its originals in memory (a simulation without a state file). A
    state directory others may write is refused first (ConfigError, exit 3), as the daemon would.
    A lock file that cannot be opened (a user's run with the default /var/lib/gpu-governor, no
    permission) is logged once and the daemon runs without: it cannot save originals there either,
    so it changes no limit. Raises :class:`StateDirBusy` (exit 10) when another process keeps it
    for ``wait_s`` seconds.
    """
    from governor.core import check_state_dirs, memory_only_originals

    if memory_only_originals(config) or not config.state_dir:
        return DaemonHold()
    check_state_dirs(config)

    def waiting(busy: StateDirBusy) -> None:
        log.warning("state_dir_busy", path=str(busy.path), holder=busy.holder_pid, why=busy.why, wait_s=wait_s)

    try:
        lock = lock_for_daemon(config.state_dir, waiter, clock, waiting, wait_s)
    except OSError as exc:
        log.warning(
            "state_lock_unavailable",
            error=str(exc.strerror or exc),
            effect="a `gpu-governor restore` cannot tell that this daemon runs",
        )
        return DaemonHold()
    return DaemonHold(lock=lock, stopped=lock is None)
