"""Who a GPU process is: identity, owner, systemd unit and class, read from /proc.

A process is identified by (pid, start time): the start time (clock ticks since
boot, field 22 of /proc/PID/stat) changes when a PID is reused, so a decision made
about one process can never hit another. Facts are cached per identity: a tick
re-reads only /proc/PID/stat for processes it already knows.

Everything read from /proc is untrusted text (a process chooses its own name and
command line): it is kept as given here and escaped where it is logged or exported.

Trust. A process's comm name and command line never grant protection, and never alone
put it in a class that signals (:attr:`governor.classes.ProcessClass.enforced_action`).
Trusted facts are the owner uid, the executable the kernel reports (/proc/PID/exe) and
the cgroup path *up to* the first unit (a user manager ``user@UID.service``, or any unit
with ``Delegate=yes``): systemd (root) creates that part; below it the delegatee creates
whatever units and slices they like (``systemd-run --user --unit=llama-server``, a
container's own systemd, a CI runner), so ``unit``, ``slice`` and ``cgroup`` see only the
part above unless a class sets ``user_units = true``. Built-in protection (display servers,
compositors) needs the executable's basename to be listed *and* the executable to be a
root-owned, not group- or world-writable file under a system directory *and* the owner
to be a real account (uid below 60000: not nobody, not a systemd DynamicUser, not a
user-namespace id) *and* the governor to find that very file at that path: the path is the
one the process's own mount namespace shows, and in a user namespace of their own any user
may mount a system binary at ``/usr/local/bin/Xorg``. A process can only get such an exe by
exec'ing that very binary. For the same reason a class's ``exe`` key matches only an exe the
governor finds at that path (:attr:`~governor.model.ProcessIdentity.exe_elsewhere`). A kernel
thread is one the kernel flags as such (PF_KTHREAD), not a process without exe or command
line (a user process whose main thread exited shows neither).

Bounded matching. ``cmdline`` and ``cgroup`` regexes (the ``regex`` module) run on at
most ``CMDLINE_MAX_BYTES`` of text with a timeout of ``MATCH_TIMEOUT_S`` per match and a
budget of ``TICK_MATCH_BUDGET_S`` per tick. A match that runs out leaves the process in
the default class for that tick (not cached, tried again next tick) and is logged once
per (pid, start time, pattern).

PID reuse. :meth:`ProcessInspector.mark_listing` records the boot-clock time just before
the GPU process list is read; a process whose start time is later than that is a new
process holding a listed PID and is marked ``newer_than_listing``: the VRAM rule
neither charges nor signals it that tick. Start times count in clock ticks (10 ms), so a
process that started in the listing's own tick is marked too (which came first is unknown).

PID namespaces. NVML lists processes by their PIDs in the host's (the kernel's initial) PID
namespace. A governor running in a PID namespace of its own (a container without the host's
PID namespace) finds under such a PID whatever process of *its* namespace holds that number:
another process, charged and signalled for memory it does not use. The daemon asks
:func:`foreign_pid_namespace` once at start (for every backend but the simulated one, whose
PIDs are this namespace's own) and hands the answer to :class:`ProcessInspector`
(``foreign_pids``). Newer drivers translate the PIDs into the caller's namespace instead
(open-gpu-kernel-modules' ``_gpuConvertPid``; seen with R560), so there a listed PID is
trusted only when the process found under it here holds an NVIDIA device open (a
``/dev/nvidia*`` among its first GPU_FD_SCAN_MAX descriptors: every CUDA process does); any
other is protected (reported, never signalled, its unit never stopped), with that reason.
"""

from __future__ import annotations

import fnmatch
import os
import pwd
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from governor.classes import MATCH_TIMEOUT_S, ProcessClass, VramPolicy, clip
from governor.model import Classification, ProcessIdentity
from governor.model import ProcessFacts as ProcessFacts  # noqa: PLC0414  (re-exported: it moved to the model)
from governor.policy import denied_unit, session_unit

if TYPE_CHECKING:  # patterns come compiled from governor.classes, which imports regex when it needs it
    import regex

CMDLINE_MAX_BYTES = 4096
"""Command lines are cut to this many bytes: enough to match on, bounded in memory and time."""
TICK_MATCH_BUDGET_S = 0.25
"""Wall-clock seconds all regex matches of one tick may take together."""
SYSTEM_EXE_PREFIXES = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/opt/")
"""Directories only root writes to: an executable there can be a built-in protected one."""
REAL_ACCOUNT_UID_LIMIT = 60000
"""Owners at or above this uid (nobody, systemd DynamicUsers, user-namespace ids) get no built-in protection."""
UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")
"""Units that have a cgroup of their own (slices aside)."""
HOST_PID_NAMESPACE = "pid:[4026531836]"
"""What ``/proc/self/ns/pid`` links to in the kernel's initial PID namespace (PROC_PID_INIT_INO,
fixed since Linux 3.8)."""
PF_KTHREAD = 0x00200000
"""The kernel's per-task flag of a kernel thread (include/linux/sched.h), in /proc/PID/stat's flags."""


def read_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is gone.

    Runs for every GPU process every tick, so it uses raw os.open/os.read: a third of the
    cost of pathlib and buffered I/O.
    """
    raw = _read_stat(pid, proc)
    return None if raw is None else _start_time_from_stat(raw)


def _read_stat(pid: int, proc: Path) -> bytes | None:
    """The bytes of /proc/PID/stat (its first 4 KiB), or None when it cannot be read."""
    try:
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


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


def read_process_state(pid: int, start_time: int, proc: Path = Path("/proc")) -> str | None:
    """The state letter of the process (pid, start_time) from /proc/PID/stat (``R`` running, ``S``
    sleeping, ``D`` uninterruptible sleep, ``Z`` zombie, ``T`` stopped ...), or None when it is gone,
    its PID names another process now (another start time) or the file holds no such letter.

    Read only for a process that outlived a SIGKILL (rare), never on the per-tick path."""
    raw = _read_stat(pid, proc)
    if raw is None or _start_time_from_stat(raw) != start_time:
        return None
    end = raw.rfind(b")")  # the name (field 2) may hold ") ": the state (field 3) follows the LAST ')'
    state = raw[end + 2 : end + 3]
    return state.decode("ascii") if state.isascii() and state.isalpha() else None


_STATE_MEANINGS = {
    "D": "uninterruptible sleep: it waits in the kernel, often in the GPU driver, and dies only once that call "
    "returns; see dmesg for Xid errors, a GPU reset or a reboot may be needed",
    "Z": "a zombie: it has exited but its parent has not reaped it, and the driver or another process sharing "
    "its GPU memory still holds that; see nvidia-smi and fuser -v /dev/nvidia*",
    "X": "dead: it is being torn down",
    "T": "stopped: a SIGKILL still ends it unless a tracer holds it",
    "t": "stopped by a tracer: a SIGKILL still ends it unless the tracer holds it",
}


def state_meaning(state: str | None) -> str:
    """What a /proc state letter (:func:`read_process_state`) says about a process that outlived a SIGKILL."""
    if state is None:
        return "unreadable: gone from /proc while the driver still lists it, or its PID names another process now"
    return _STATE_MEANINGS.get(state, "alive: the SIGKILL did not reach it, see the outcome")


def foreign_pid_namespace(proc: Path = Path("/proc")) -> str | None:
    """Why PIDs of the host's PID namespace (NVML's) do not name processes in ``proc`` here, or None
    when the governor runs in the host's PID namespace. Unreadable counts as foreign: never signal on
    a guess."""
    try:
        namespace = os.readlink(proc / "self" / "ns" / "pid")
    except OSError as exc:
        return (
            f"cannot tell whether the governor runs in the host's PID namespace "
            f"({proc}/self/ns/pid: {exc.strerror or exc}): NVML's host PIDs are not trusted to name processes here"
        )
    if namespace == HOST_PID_NAMESPACE:
        return None
    return (
        f"the governor runs in a PID namespace of its own ({namespace}, not the host's {HOST_PID_NAMESPACE}): "
        "NVML lists host PIDs, which name other processes here"
    )


def _kernel_thread_from_stat(raw: bytes) -> bool:
    """True when the kernel's own flag (PF_KTHREAD, field 9) says the process is a kernel thread.

    Not guessed from an empty command line, a missing exe and PID 1 or 2 as parent: a user
    process whose main thread exited (its other threads running on) shows exactly that."""
    end = raw.rfind(b")")
    if end < 0:
        return False
    fields = raw[end + 2 :].split()
    try:
        return bool(int(fields[6]) & PF_KTHREAD)  # field 9 overall
    except (IndexError, ValueError):
        return False


GPU_DEVICE_PREFIX = "/dev/nvidia"
"""What a descriptor of a process using an NVIDIA GPU points at (nvidiactl, nvidia0, nvidia-uvm, ...)."""
GPU_FD_SCAN_MAX = 1 << 16
"""The most descriptors of one process looked at for an NVIDIA device (once per process)."""


def holds_gpu_device(base: Path, prefix: str = GPU_DEVICE_PREFIX) -> bool:
    """Whether the process at ``base`` (``/proc/PID``) has a file under ``prefix`` open, among
    its first GPU_FD_SCAN_MAX descriptors; False when they cannot be listed."""
    try:
        with os.scandir(base / "fd") as entries:
            for count, entry in enumerate(entries):
                if count >= GPU_FD_SCAN_MAX:
                    return False
                try:
                    if os.readlink(entry.path).startswith(prefix):
                        return True
                except OSError:
                    continue
    except OSError:
        return False
    return False


def _read_text(path: Path, limit: int = CMDLINE_MAX_BYTES) -> str | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit)
    except OSError:
        return None
    return data.decode("utf-8", errors="surrogateescape")


def system_cgroup(cgroup: str | None) -> str | None:
    """The part of a cgroup path systemd itself created: cut after the first unit.

    systemd creates slices and, in them, one cgroup per unit; anything below a unit's
    cgroup was created by whoever the unit delegates it to (``Delegate=yes``): a user
    manager (``user@UID.service``), a container, a service running as any user. Its
    names are free, so ``.../ci.service/x/sshd.service`` is a process of ci.service.
    """
    if cgroup is None:
        return None
    parts = cgroup.split("/")
    for i, part in enumerate(parts):
        if part.endswith(UNIT_SUFFIXES):
            return "/".join(parts[: i + 1])
    return cgroup


def _cgroup_parts(cgroup: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(unit, slices) from a cgroup v2 path such as /system.slice/ollama.service."""
    if not cgroup:
        return None, ()
    parts = [p for p in cgroup.split("/") if p]
    slices = tuple(p for p in parts if p.endswith(".slice"))
    unit = None
    for part in reversed(parts):
        if part.endswith(UNIT_SUFFIXES):
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


class _Deadline:
    """The regex time one tick may still spend (seconds; only time spent matching counts)."""

    def __init__(self, budget_s: float) -> None:
        self.left_s = budget_s

    def search(self, pattern: regex.Pattern[str], text: str) -> bool | None:
        """Whether ``pattern`` is found in ``text``; None when the time bound ran out."""
        bound = min(MATCH_TIMEOUT_S, self.left_s)
        if bound <= 0:
            return None
        began = time.monotonic()
        try:
            return pattern.search(text[:CMDLINE_MAX_BYTES], timeout=bound) is not None
        except TimeoutError:
            return None
        finally:
            self.left_s -= time.monotonic() - began


class MatchTimedOut(Exception):
    """A pattern match ran out of time; ``pattern`` is its source text."""

    def __init__(self, key: str, pattern: str) -> None:
        super().__init__(f"{key} match /{clip(pattern)}/ timed out")
        self.key = key
        self.pattern = pattern


def _search(deadline: _Deadline, key: str, pattern: regex.Pattern[str], text: str | None) -> bool:
    if text is None:
        return False
    found = deadline.search(pattern, text)
    if found is None:
        raise MatchTimedOut(key, pattern.pattern)
    return found


def _match(klass: ProcessClass, facts: ProcessIdentity | ProcessFacts, deadline: _Deadline) -> str | None:
    """Why ``klass`` matches ``facts`` (every given key must), or None; raises MatchTimedOut."""
    m = klass.match
    if m.is_empty():
        return None
    cgroup = facts.cgroup if m.user_units else system_cgroup(facts.cgroup)
    unit, slices = _cgroup_parts(cgroup) if m.user_units else (facts.unit, facts.slices)
    reasons = []
    if m.name is not None:
        if facts.name is None or not fnmatch.fnmatchcase(facts.name, m.name):
            return None
        reasons.append(f"name {facts.name!r} matches {m.name!r}")
    if m.exe is not None:
        if facts.exe is None or facts.exe_elsewhere or not fnmatch.fnmatchcase(facts.exe, m.exe):
            return None
        reasons.append(f"exe matches {m.exe!r}")
    if m.user is not None:
        if m.user != facts.user and m.user != str(facts.uid):
            return None
        reasons.append(f"user {m.user}")
    if m.unit is not None:
        if unit is None or not fnmatch.fnmatchcase(unit, m.unit):
            return None
        reasons.append(f"unit {unit}" + (" (user units allowed)" if m.user_units else ""))
    if m.slice is not None:
        if not any(fnmatch.fnmatchcase(s, m.slice) for s in slices):
            return None
        reasons.append(f"slice matches {m.slice!r}")
    # The regexes last: the cheap, trusted keys above rule most classes out first.
    if m.cgroup is not None:
        if not _search(deadline, "cgroup", m.cgroup, cgroup):
            return None
        reasons.append(f"cgroup matches /{m.cgroup.pattern}/")
    if m.cmdline is not None:
        if not _search(deadline, "cmdline", m.cmdline, facts.cmdline):
            return None
        reasons.append(f"cmdline matches /{m.cmdline.pattern}/")
    return " and ".join(reasons)


def classify(
    facts: ProcessIdentity | ProcessFacts, policy: VramPolicy, deadline: _Deadline | None = None
) -> tuple[str, str]:
    """(class name, why): the first class in file order whose every match key matches.

    Raises MatchTimedOut when a pattern match ran out of time before a class was found.
    """
    deadline = deadline if deadline is not None else _Deadline(TICK_MATCH_BUDGET_S)
    for klass in policy.classes:
        why = _match(klass, facts, deadline)
        if why is not None:
            return klass.name, f"class {klass.name}: {why}"
    return policy.default_class.name, "no class matched"


def protection(facts: ProcessFacts, policy: VramPolicy, own_pid: int, own_unit: str | None = None) -> str | None:
    """Why this process must never be signalled (nor its unit stopped), or None (never from its
    name or command line). Processes of a system unit on the deny list, or of the governor's own
    unit, are protected; a user session's units are judged by the actions themselves."""
    if facts.pid == own_pid:
        return "the governor itself"
    if facts.pid <= 1:
        return "PID 1"
    if facts.kernel_thread:
        return "a kernel thread"
    if facts.unit is not None and not session_unit(facts.slices):
        if own_unit is not None and facts.unit == own_unit:
            return f"the governor's own unit {own_unit}"
        entry = denied_unit(facts.unit)
        if entry is not None:
            return f"unit {facts.unit} is on the built-in deny list ({entry})"
    exe_name = facts.exe_name
    if (
        exe_name is not None
        and exe_name in policy.protected_names
        and facts.system_exe
        and facts.uid is not None
        and facts.uid < REAL_ACCOUNT_UID_LIMIT
    ):
        return f"protected executable {exe_name!r} (display server, compositor or driver daemon)"
    if policy.class_named(facts.klass).protected:
        return f"class {facts.klass} is protected"
    return None


def classified(
    who: ProcessIdentity | ProcessFacts,
    policy: VramPolicy,
    own_pid: int,
    deadline: _Deadline | None = None,
    own_unit: str | None = None,
) -> ProcessFacts:
    """The facts of the process ``who``: its identity with its class, why it matched, and
    whether it is protected (of a ProcessFacts, only the identity is used).

    A match that ran out of time gives the default class and ``unresolved`` (for this tick).
    """
    identity = who.identity if isinstance(who, ProcessFacts) else who
    try:
        klass, why = classify(identity, policy, deadline)
        classification = Classification(klass, why)
    except MatchTimedOut as exc:
        classification = Classification(policy.default_class.name, f"unclassified this tick: {exc}", unresolved=True)
        _log_timeout_once(identity, exc)
    facts = ProcessFacts(identity, classification)
    return facts.classified_as(protected=protection(facts, policy, own_pid, own_unit))


_TIMEOUTS_LOGGED: dict[tuple[int, int | None, str, str], None] = {}
_TIMEOUTS_LOGGED_MAX = 4096


def _log_timeout_once(facts: ProcessIdentity, exc: MatchTimedOut) -> None:
    key = (facts.pid, facts.start_time, exc.key, exc.pattern)
    if key in _TIMEOUTS_LOGGED:
        return
    if len(_TIMEOUTS_LOGGED) >= _TIMEOUTS_LOGGED_MAX:
        _TIMEOUTS_LOGGED.pop(next(iter(_TIMEOUTS_LOGGED)))
    _TIMEOUTS_LOGGED[key] = None
    import structlog

    structlog.get_logger("governor.processes").warning(
        "process_match_timed_out",
        pid=facts.pid,
        start_time=facts.start_time,
        key=exc.key,
        pattern=clip(exc.pattern),
        timeout_s=MATCH_TIMEOUT_S,
        outcome="unclassified for this tick",
    )


_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def boot_time_ticks() -> int:
    """Now on the boot clock, in the clock ticks /proc/PID/stat uses for start times."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLOCK_TICKS_PER_S)


class ProcessInspector:
    """Reads and caches ProcessFacts for the PIDs a backend reports.

    Facts are cached per (pid, start time) for one policy (pattern set); a new policy
    object empties the cache. The daemon calls :meth:`forget_except` once per tick,
    which also starts the next tick's match budget and marks the listing time used to
    spot reused PIDs (a new process gets one tick of grace, never a charge it did not
    earn); :meth:`mark_listing` marks it exactly, right before a listing.

    ``foreign_pids``: why the listed PIDs may not name processes in ``proc``
    (:func:`foreign_pid_namespace`); when set, a process is protected with that reason unless
    it holds an NVIDIA device open (``gpu_device_prefix``; see the module docstring).
    """

    def __init__(
        self,
        proc: Path = Path("/proc"),
        own_pid: int | None = None,
        own_unit: str | None = None,
        foreign_pids: str | None = None,
    ) -> None:
        self.proc = proc
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self.own_unit = own_unit  # the governor's own systemd unit (its processes are never touched)
        self.foreign_pids = foreign_pids  # why listed PIDs name no process here (foreign_pid_namespace), or None
        self.gpu_device_prefix = GPU_DEVICE_PREFIX  # a process trusted in a foreign namespace holds one open
        self.host_root = host_root(proc)  # where exe paths are looked up: init's view of the filesystem
        self._cache: dict[int, ProcessFacts] = {}
        self._policy: VramPolicy | None = None
        self._deadline = _Deadline(TICK_MATCH_BUDGET_S)
        self._listed_at_ticks: int | None = None

    def mark_listing(self, now_ticks: int | None = None) -> None:
        """Note that the GPU process list is read now (boot-clock ticks); starts a tick's match budget."""
        self._listed_at_ticks = boot_time_ticks() if now_ticks is None else now_ticks
        self._deadline.left_s = TICK_MATCH_BUDGET_S  # the same deadline, full again (none is built per tick)

    def facts(self, pid: int, reported_name: str | None, policy: VramPolicy) -> ProcessFacts:
        """Facts for ``pid`` (cached while its start time and the policy are unchanged)."""
        if policy is not self._policy:
            self._cache.clear()
            self._policy = policy
        start = read_start_time(pid, self.proc)
        cached = self._cache.get(pid)
        if cached is not None and cached.start_time == start and (start is not None or cached.name == reported_name):
            return cached
        facts = self._read(pid, start, reported_name, policy)
        if start is not None and self._listed_at_ticks is not None and start >= self._listed_at_ticks:
            # Started after the listing, or in its clock tick (10 ms: which came first is not known):
            # whatever was listed under this pid may have been another process.
            return facts.seen_as(newer_than_listing=True)
        if not facts.unresolved:
            self._cache[pid] = facts
        return facts

    def forget_except(self, live: Iterable[int]) -> None:
        """Drop cached facts of PIDs no GPU reports any more; the next listing comes after now."""
        if self._cache:
            keep = set(live)
            for pid in [p for p in self._cache if p not in keep]:
                del self._cache[pid]
        self.mark_listing()

    def clear(self) -> None:
        """Forget every cached fact (after a config reload, classes may differ)."""
        self._cache.clear()

    def _read(self, pid: int, start: int | None, reported_name: str | None, policy: VramPolicy) -> ProcessFacts:
        base = self.proc / str(pid)
        name = exe = cmdline = cgroup = None
        uid: int | None = None
        kernel_thread = system_exe = exe_elsewhere = False
        if start is not None:
            comm = _read_text(base / "comm", 256)
            name = comm.removesuffix("\n") if comm is not None else None  # the kernel's newline, not the name's
            try:
                exe = os.readlink(base / "exe")
                info = os.stat(base / "exe")
                exe_elsewhere = not _same_file_here(exe, info, self.host_root)
                system_exe = not exe_elsewhere and _is_system_file(exe, info)
            except OSError:
                pass
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
                kernel_thread = _kernel_thread_from_stat((base / "stat").read_bytes())
            except OSError:
                kernel_thread = False
        if name is None:
            name = reported_name
        unit, slices = _cgroup_parts(system_cgroup(cgroup))
        identity = ProcessIdentity(
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
            system_exe=system_exe,
            exe_elsewhere=exe_elsewhere,
        )
        facts = classified(identity, policy, self.own_pid, self._deadline, self.own_unit)
        foreign = self.foreign_pids is not None and facts.protected is None
        if foreign and (start is None or not holds_gpu_device(base, self.gpu_device_prefix)):
            why = f"{self.foreign_pids}; the process under this PID here holds no {self.gpu_device_prefix}* device"
            return facts.classified_as(protected=why)
        return facts


def _is_system_file(path: str, info: os.stat_result) -> bool:
    """True for a root-owned regular file (``info``), not group/world-writable, whose path is
    under a system directory."""
    return (
        path.startswith(SYSTEM_EXE_PREFIXES)
        and stat.S_ISREG(info.st_mode)
        and info.st_uid == 0
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def host_root(proc: Path = Path("/proc")) -> str:
    """``/proc/1/root`` (init's root: the host's view of the filesystem, whatever the governor's
    own mount namespace hides, such as ``/home`` under ``ProtectHome=``) when it can be looked
    through (root with ``CAP_SYS_PTRACE``), else "" (the governor's own view)."""
    root = proc / "1" / "root"
    try:
        os.stat(root)
    except OSError:
        return ""
    return str(root)


def _same_file_here(path: str, info: os.stat_result, root: str = "") -> bool:
    """True when the very file ``info`` describes (device and inode) is at ``path`` under ``root``
    (:func:`host_root`; "" for the governor's own view).

    ``path`` is the exe as the process's own mount namespace names it: in a user namespace any
    user may mount a binary of theirs at ``/usr/bin/ollama`` (or a system binary at
    ``/usr/local/bin/Xorg``) for themselves, so the path is believed only when it leads to the
    same file on the host."""
    try:
        here = os.stat(root + path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (info.st_dev, info.st_ino)


def own_system_unit(proc: Path = Path("/proc")) -> str | None:
    """The system unit this process runs in (``gpu-governor.service``), or None (a user
    session, a container without systemd)."""
    text = _read_text(proc / "self" / "cgroup", 8192)
    if not text or not text.strip():
        return None
    cgroup = text.splitlines()[-1].split(":", 2)[-1]
    unit, slices = _cgroup_parts(system_cgroup(cgroup))
    return None if session_unit(slices) else unit
