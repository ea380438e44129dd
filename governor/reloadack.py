"""The reload handshake: ``systemctl reload`` returns once the daemon has applied or refused the file.

Debian 12's systemd (252) has no ``Type=notify-reload`` (253 added it): with
``ExecReload=/bin/kill -HUP $MAINPID`` the reload job ends as soon as kill(1) has exited, before
the daemon has even read the file, unless the daemon's RELOADING=1 happens to reach systemd
first (a race a daemon busy with a tick loses), and a file the daemon refuses is reported as
"Reloaded". The unit runs ``gpu-governor reload --pid $MAINPID`` instead, which sends the
SIGHUP and waits for the daemon's acknowledgement.

The daemon (:class:`ReloadAcks`) notes CLOCK_MONOTONIC when a reload begins, before it looks at
the file (the same instant it sends as RELOADING=1's MONOTONIC_USEC=). When the reload has ended,
applied or refused, it publishes the metrics again, sends READY=1 and then replaces
``reload.json`` (0600, written to a temporary file and renamed) in :func:`ack_directory`: the
directory systemd made for the unit (``$RUNTIME_DIRECTORY``, which it sets for ExecReload= too,
so both sides agree whatever the config says: a ``--simulate`` run keeps its runtime_dir in a
private directory), else the config's runtime_dir::

    {"pid": 1234, "reload": 3, "began_monotonic_us": 81234567890, "result": "refused", "errors": ["..."]}

The command (:func:`request_reload`) opens a pidfd on the daemon, notes CLOCK_MONOTONIC, sends
SIGHUP through the pidfd, and waits for an acknowledgement naming that PID and a reload that
began at or after that instant: such a reload read the file after the command started, so it saw
every edit made before it. systemd's own notify-reload applies the same rule (RELOADING=1's
MONOTONIC_USEC= against the time it sent the signal). What that rule covers:

* a reload already under way when the command starts began before it: not taken; the SIGHUP
  waits in the daemon's pipe, or, when it arrives while that reload waits for the file to
  settle, is queued again (:func:`governor.waiting.settle`), so a reload of its own follows;
* a SIGHUP storm is drained into fewer reloads; every command takes the first one that began
  after its own signal;
* a daemon that exits meanwhile makes the pidfd readable: the command fails at once (after one
  last look at the file), it does not wait for its timeout;
* a file left by an earlier daemon names another PID; one planted by another user is refused
  unread (the runtime directory is root's, 0755: only root can write there, but the file is
  checked anyway: a regular file, not a link, owned by the caller, writable by nobody else,
  at most 64 KiB, every field of the expected type).
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from governor.errors import EXIT_NO_RELOAD, CliError, ReloadRefused, UnusableFile
from governor.notify import Notifier
from governor.safefile import parse_json, read_bounded, write_atomic

ACK_FILE: Final = "reload.json"
"""The acknowledgement's name in :func:`ack_directory`."""
MAX_ACK_BYTES: Final = 64 * 1024
"""Size cap of the acknowledgement (bytes): a real one is well under 4 KiB."""
MAX_ACK_ERRORS: Final = 20
"""At most this many error lines of a refused reload are written (a ConfigError's summary is as long)."""
MAX_ERROR_CHARS: Final = 1000
"""Each error line is cut to this many characters."""
DEFAULT_RUNTIME_DIR: Final = "/run/gpu-governor"
"""The command's directory outside systemd: the config's default runtime_dir."""
DEFAULT_TIMEOUT_S: Final = 60.0
"""How long ``reload`` waits by default (seconds): below the unit's TimeoutStartSec= (90 s), which systemd
applies to ExecReload=, so the command, not systemd's kill, says why."""
POLL_S: Final = 0.05
"""How often the command looks at the acknowledgement while it waits (seconds)."""


def monotonic_us() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock sd_notify's MONOTONIC_USEC= uses, one per boot for every process."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def ack_directory(fallback: str, environ: Mapping[str, str] | None = None) -> str:
    """Where acknowledgements go: the first directory of ``$RUNTIME_DIRECTORY`` (systemd's
    RuntimeDirectory=, set for the main process and ExecReload= alike), else ``fallback`` ("": none)."""
    first = (os.environ if environ is None else environ).get("RUNTIME_DIRECTORY", "").split(":")[0]
    return first if os.path.isabs(first) else fallback


# --------------------------------------------------------------------------- the daemon's side


class ReloadAcks:
    """The daemon's half: RELOADING=1 when a reload begins; when it ends, the metrics published
    again, READY=1 (with STATUS=) and ``reload.json`` replaced.

    The file goes to :func:`ack_directory` (``runtime_dir`` outside systemd; empty there: no
    file, as in a what-if run, which never reloads anyway). A file that cannot be written is logged
    (``reload_ack_failed``: a warning, or a debug event when the directory does not exist, as
    outside systemd without RuntimeDirectory=) and the daemon carries on; a waiting command then
    times out and says where it looked.
    """

    def __init__(
        self,
        runtime_dir: str,
        notifier: Notifier,
        publish: Callable[[], None],
        log: Any,
        pid: int | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        directory = ack_directory(runtime_dir, environ)
        self.path = Path(directory) / ACK_FILE if directory else None
        self._notifier = notifier
        self._publish = publish
        self._log = log
        self.pid = os.getpid() if pid is None else pid
        self.count = 0  # reloads ended (applied or refused) by this process
        self.began_us: int | None = None  # CLOCK_MONOTONIC (us) when the reload under way began

    def begin(self) -> None:
        """A reload begins, before the file is looked at: note the time, send RELOADING=1."""
        self.began_us = monotonic_us()
        self._notifier.reloading()

    def applied(self, status: str) -> None:
        """The new config is in force."""
        self._ended(status, [])

    def refused(self, errors: list[str], status: str) -> None:
        """The file was refused (``errors``: what is wrong with it); the running config stays."""
        self._ended(status, errors or ["refused"])

    def _ended(self, status: str, errors: list[str]) -> None:
        self.count += 1
        self._publish()  # the reload's metrics (result, counts) current before anyone is told
        self._notifier.ready(status)  # before the file: systemd reads READY=1 before the command's exit
        if self.path is None:
            return
        began = self.began_us if self.began_us is not None else monotonic_us()
        document = {
            "pid": self.pid,
            "reload": self.count,
            "began_monotonic_us": began,
            "result": "refused" if errors else "applied",
            "errors": [line[:MAX_ERROR_CHARS] for line in errors[:MAX_ACK_ERRORS]],
        }
        try:
            write_atomic(self.path, json.dumps(document).encode(), durable=False)  # /run is tmpfs
        except OSError as exc:
            error = exc.strerror or str(exc)
            if exc.errno == errno.ENOENT:  # no runtime directory (not under systemd): nobody waits on it
                self._log.debug("reload_ack_failed", path=str(self.path), error=error)
            else:
                self._log.warning("reload_ack_failed", path=str(self.path), error=error)


# --------------------------------------------------------------------------- the command's side


@dataclass(frozen=True, slots=True)
class Ack:
    """One acknowledgement as read back: which process, its reload count, when that reload began
    (CLOCK_MONOTONIC, us), and the errors that made it refuse the file (empty: applied)."""

    pid: int
    reload: int
    began_monotonic_us: int
    errors: tuple[str, ...]

    @property
    def applied(self) -> bool:
        return not self.errors


def _trusted(euid: int) -> Callable[[os.stat_result], list[str]]:
    def problems(info: os.stat_result) -> list[str]:
        found = []
        if info.st_uid != euid:
            found.append(f"owned by uid {info.st_uid}, not {euid}")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            found.append("writable by group or others")
        return found

    return problems


def _int(document: dict[str, Any], key: str) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key}: expected a whole number >= 0, got {value!r:.40}")
    return value


def read_ack(path: Path, euid: int | None = None) -> Ack:
    """The acknowledgement at ``path``; FileNotFoundError when there is none, UnusableFile when it is
    not one the daemon (running as ``euid``, default ours) wrote."""
    owner = os.geteuid() if euid is None else euid
    document = parse_json(path, read_bounded(path, MAX_ACK_BYTES, _trusted(owner)))
    try:
        if not isinstance(document, dict):
            raise ValueError(f"expected a JSON object, got {type(document).__name__}")
        result, errors = document.get("result"), document.get("errors")
        if result not in ("applied", "refused"):
            raise ValueError(f"result: expected applied or refused, got {result!r:.40}")
        if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors):
            raise ValueError("errors: expected a list of strings")
        if (result == "refused") != bool(errors):
            raise ValueError(f"errors: expected {'some' if result == 'refused' else 'none'} for result {result}")
        pid, count, began = _int(document, "pid"), _int(document, "reload"), _int(document, "began_monotonic_us")
    except ValueError as exc:
        raise UnusableFile(path, f"not a reload acknowledgement: {exc}") from None
    return Ack(pid, count, began, tuple(e[:MAX_ERROR_CHARS] for e in errors[:MAX_ACK_ERRORS]))


def _look(path: Path, pid: int, sent_us: int, seen: list[str]) -> Ack | None:
    """The acknowledgement of ``pid``'s reload that began at or after ``sent_us``, if it is there yet;
    why the file is not one goes into ``seen`` (for the message when nothing comes)."""
    try:
        ack = read_ack(path)
    except FileNotFoundError:
        return None
    except UnusableFile as exc:
        seen[:] = [str(exc)]
        return None
    if ack.pid != pid:
        seen[:] = [f"{path} names PID {ack.pid}, not {pid}"]
        return None
    if ack.began_monotonic_us < sent_us:
        seen[:] = [f"{path} acknowledges only reload {ack.reload}, which began before the signal"]
        return None
    return ack


def request_reload(
    pid: int,
    runtime_dir: Path,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    poll_s: float = POLL_S,
    sig: int = signal.SIGHUP,
) -> Ack:
    """Send ``sig`` (SIGHUP) to the daemon ``pid`` and wait at most ``timeout_s`` seconds for its
    acknowledgement of a reload that began after the signal; raises :class:`ReloadRefused` (exit 3)
    when it refused the file, CliError (exit :data:`EXIT_NO_RELOAD`) when no acknowledgement came:
    no such process, signal not permitted, it exited, or the time ran out."""
    path = runtime_dir / ACK_FILE
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise CliError(f"reload: no process {pid} (is the daemon running?)", EXIT_NO_RELOAD) from None
    except OSError as exc:
        raise CliError(f"reload: cannot watch process {pid}: {exc.strerror or exc}", EXIT_NO_RELOAD) from None
    try:
        sent_us = monotonic_us()
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            raise CliError(f"reload: process {pid} exited before it was asked to reload", EXIT_NO_RELOAD) from None
        except OSError as exc:
            raise CliError(f"reload: cannot signal process {pid}: {exc.strerror or exc}", EXIT_NO_RELOAD) from None
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        while True:
            ack = _look(path, pid, sent_us, seen)
            if ack is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                why = f" ({seen[0]})" if seen else f" ({path} does not exist)" if not path.exists() else ""
                raise CliError(
                    f"reload: process {pid} did not acknowledge the reload within {timeout_s:g} s{why}; "
                    "the SIGHUP stays queued and the reload may still happen: see journalctl -u gpu-governor",
                    EXIT_NO_RELOAD,
                )
            exited, _, _ = select.select([pidfd], [], [], min(poll_s, left))
            if exited:  # the pidfd turns readable when the process has exited
                ack = _look(path, pid, sent_us, seen)
                if ack is not None:
                    break
                raise CliError(f"reload: process {pid} exited before it finished the reload", EXIT_NO_RELOAD)
    finally:
        os.close(pidfd)
    if not ack.applied:
        raise ReloadRefused(pid, ack.errors)
    return ack
