"""Who a GPU process is: identity, owner, systemd unit and class, read from /proc.

A process is identified by (pid, start time): the start time (clock ticks since
boot, field 22 of /proc/PID/stat) changes when a PID is reused, so a decision made
about one process can never hit another. Facts are cached per identity: a tick
re-reads only /proc/PID/stat for processes it already knows.

Everything read from /proc is untrusted text (a process chooses its own name and
command line): it is kept as given here and escaped where it is logged or exported.
"""

from __future__ import annotations

import fnmatch
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from governor.classes import ProcessClass, VramPolicy

CMDLINE_MAX_BYTES = 4096
"""Command lines are cut to this many bytes: enough to match on, bounded in memory."""


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    """What /proc says about one process, and the class it was given (with why)."""

    pid: int
    start_time: int | None  # clock ticks since boot; None when the process is not visible
    name: str | None
    exe: str | None
    cmdline: str | None
    uid: int | None
    user: str | None
    cgroup: str | None
    unit: str | None
    slices: tuple[str, ...]
    kernel_thread: bool
    klass: str
    why: str
    protected: str | None  # reason it must never be signalled, or None


def read_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is gone.

    Runs for every GPU process every tick, so it uses raw os.open/os.read: a third of the
    cost of pathlib and buffered I/O.
    """
    try:
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _start_time_from_stat(raw)


def _start_time_from_stat(raw: bytes) -> int | None:
    # The name (field 2) is in parentheses and may itself contain ") " or spaces:
    # fields after it start after the LAST ')'.
    end = raw.rfind(b")")
    if end < 0:
        return None
    fields = raw[end + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def _ppid_from_stat(raw: bytes) -> int | None:
    end = raw.rfind(b")")
    fields = raw[end + 2 :].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def _read_text(path: Path, limit: int = CMDLINE_MAX_BYTES) -> str | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit)
    except OSError:
        return None
    return data.decode("utf-8", errors="surrogateescape")


def _cgroup_parts(cgroup: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(unit, slices) from a cgroup v2 path such as /system.slice/ollama.service."""
    if not cgroup:
        return None, ()
    parts = [p for p in cgroup.split("/") if p]
    slices = tuple(p for p in parts if p.endswith(".slice"))
    unit = None
    for part in reversed(parts):
        if part.endswith((".service", ".scope", ".socket", ".mount")):
            unit = part
            break
    return unit, slices


def _user_name(uid: int | None) -> str | None:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _match(klass: ProcessClass, facts: ProcessFacts) -> str | None:
    """Why ``klass`` matches ``facts`` (every given key must), or None."""
    m = klass.match
    if m.is_empty():
        return None
    reasons = []
    if m.name is not None:
        if facts.name is None or not fnmatch.fnmatchcase(facts.name, m.name):
            return None
        reasons.append(f"name {facts.name!r} matches {m.name!r}")
    if m.exe is not None:
        if facts.exe is None or not fnmatch.fnmatchcase(facts.exe, m.exe):
            return None
        reasons.append(f"exe matches {m.exe!r}")
    if m.cmdline is not None:
        if facts.cmdline is None or m.cmdline.search(facts.cmdline) is None:
            return None
        reasons.append(f"cmdline matches /{m.cmdline.pattern}/")
    if m.user is not None:
        if m.user != facts.user and m.user != str(facts.uid):
            return None
        reasons.append(f"user {m.user}")
    if m.unit is not None:
        if facts.unit is None or not fnmatch.fnmatchcase(facts.unit, m.unit):
            return None
        reasons.append(f"unit {facts.unit}")
    if m.slice is not None:
        if not any(fnmatch.fnmatchcase(s, m.slice) for s in facts.slices):
            return None
        reasons.append(f"slice matches {m.slice!r}")
    if m.cgroup is not None:
        if facts.cgroup is None or m.cgroup.search(facts.cgroup) is None:
            return None
        reasons.append(f"cgroup matches /{m.cgroup.pattern}/")
    return " and ".join(reasons)


def classify(facts: ProcessFacts, policy: VramPolicy) -> tuple[str, str]:
    """(class name, why): the first class in file order whose every match key matches."""
    for klass in policy.classes:
        why = _match(klass, facts)
        if why is not None:
            return klass.name, f"class {klass.name}: {why}"
    return policy.default_class.name, "no class matched"


def protection(facts: ProcessFacts, policy: VramPolicy, own_pid: int) -> str | None:
    """Why this process must never be signalled, or None."""
    if facts.pid == own_pid:
        return "the governor itself"
    if facts.pid <= 1:
        return "PID 1"
    if facts.kernel_thread:
        return "a kernel thread"
    if facts.name is not None and facts.name in policy.protected_names:
        return f"protected name {facts.name!r} (display server, compositor or driver daemon)"
    if policy.class_named(facts.klass).protected:
        return f"class {facts.klass} is protected"
    return None


def classified(facts: ProcessFacts, policy: VramPolicy, own_pid: int) -> ProcessFacts:
    """``facts`` with its class, why it matched, and whether it is protected, filled in."""
    klass, why = classify(facts, policy)
    facts = replace(facts, klass=klass, why=why)
    return replace(facts, protected=protection(facts, policy, own_pid))


class ProcessInspector:
    """Reads and caches ProcessFacts for the PIDs a backend reports."""

    def __init__(self, proc: Path = Path("/proc"), own_pid: int | None = None) -> None:
        self.proc = proc
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self._cache: dict[int, ProcessFacts] = {}

    def facts(self, pid: int, reported_name: str | None, policy: VramPolicy) -> ProcessFacts:
        """Facts for ``pid`` (cached while its start time is unchanged)."""
        start = read_start_time(pid, self.proc)
        cached = self._cache.get(pid)
        if cached is not None and cached.start_time == start and (start is not None or cached.name == reported_name):
            return cached
        facts = self._read(pid, start, reported_name, policy)
        self._cache[pid] = facts
        return facts

    def forget_except(self, live: Iterable[int]) -> None:
        """Drop cached facts of PIDs no GPU reports any more."""
        keep = set(live)
        for pid in [p for p in self._cache if p not in keep]:
            del self._cache[pid]

    def clear(self) -> None:
        """Forget every cached fact (after a config reload, classes may differ)."""
        self._cache.clear()

    def _read(self, pid: int, start: int | None, reported_name: str | None, policy: VramPolicy) -> ProcessFacts:
        base = self.proc / str(pid)
        name = exe = cmdline = cgroup = None
        uid: int | None = None
        kernel_thread = False
        if start is not None:
            comm = _read_text(base / "comm", 256)
            name = comm.removesuffix("\n") if comm is not None else None  # the kernel's newline, not the name's
            try:
                exe = os.readlink(base / "exe")
            except OSError:
                exe = None
            raw_cmdline = _read_text(base / "cmdline")
            cmdline = raw_cmdline.replace("\x00", " ").strip() if raw_cmdline is not None else None
            try:
                uid = (base).stat().st_uid
            except OSError:
                uid = None
            cgroup_text = _read_text(base / "cgroup", 8192)
            if cgroup_text is not None:
                cgroup = cgroup_text.splitlines()[-1].split(":", 2)[-1] if cgroup_text.strip() else None
            try:
                ppid = _ppid_from_stat((base / "stat").read_bytes())
            except OSError:
                ppid = None
            kernel_thread = ppid == 2 or pid == 2 or (not cmdline and exe is None and ppid is not None and ppid <= 2)
        if name is None:
            name = reported_name
        unit, slices = _cgroup_parts(cgroup)
        draft = ProcessFacts(
            pid=pid,
            start_time=start,
            name=name,
            exe=exe,
            cmdline=cmdline,
            uid=uid,
            user=_user_name(uid),
            cgroup=cgroup,
            unit=unit,
            slices=slices,
            kernel_thread=kernel_thread,
            klass=policy.default_class.name,
            why="",
            protected=None,
        )
        return classified(draft, policy, self.own_pid)
