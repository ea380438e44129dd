"""Real processes a simulated GPU reports: ``[simulation] processes_file``.

A test (or a demonstration) runs real processes, under real systemd units, and wants the
simulated GPU to report them as NVML would, with the VRAM it says. It writes a JSON file::

    {"processes": [
        {"gpu": 0, "cgroup": "/system.slice/comfyui.service", "used_bytes": 3221225472},
        {"gpu": 0, "pid": 4242, "used_bytes": 1610612736, "name": "game"}
    ]}

An entry names one process by ``pid``, or every process of a unit by its cgroup path (as
``/proc/PID/cgroup`` shows it, systemd's hierarchy): a unit that systemd restarts comes
back with new PIDs and is still reported. A process belongs to the first unit of its
cgroup path, by the governor's own rule (:func:`governor.processes.system_cgroup`): one
below a ``Delegate=yes`` unit (a user manager, a CI runner) is that unit's, whatever it
names its own cgroups, so ``.../user@1000.service/system.slice/comfyui.service`` is not
``comfyui.service``. The path up to that unit must be the entry's or end with it (a
container whose cgroups sit below the host's); an entry's path must end at its unit.
Like NVML, only processes that exist are reported: a process that exited is gone from the
next reading. ``gpu`` defaults to 0; ``name`` to what ``/proc/PID/comm`` says.

The file is read bounded (:func:`governor.safefile.read_json`) again whenever it changes
(inode, size, modification time); a file that cannot be used reports no process and sets
``warning``. At most ``MAX_ENTRIES`` entries. The file names processes the governor may
signal or whose units it may stop, so a daemon running as root uses it only while it is
owned by root and writable by no one else (as its config), else reports no process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from governor.model import ProcessReading
from governor.processes import system_cgroup
from governor.safefile import UnusableFile, read_json, root_trust_problems, short_repr

MAX_ENTRIES = 256


@dataclass(frozen=True, slots=True)
class RealProcess:
    """One entry: a pid or a cgroup path, its GPU index, the bytes it holds and a name."""

    gpu: int
    used_bytes: int
    pid: int | None = None
    cgroup: str | None = None
    name: str | None = None


def _int(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def parse_entries(data: Any) -> tuple[list[RealProcess], list[str]]:
    """The valid entries of a processes document and a problem per bad one."""
    listed = data.get("processes") if isinstance(data, dict) else None
    if not isinstance(listed, list) or len(listed) > MAX_ENTRIES:
        return [], [f"expected an object with a list 'processes' of at most {MAX_ENTRIES} entries"]
    out, problems = [], []
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict):
            problems.append(f"processes[{i}]: expected an object, got {short_repr(entry)}")
            continue
        gpu = _int(entry.get("gpu", 0), 0, 63)
        used = _int(entry.get("used_bytes"), 0, 2**50)
        pid = _int(entry.get("pid"), 1, 2**22) if "pid" in entry else None
        cgroup = entry.get("cgroup")
        name = entry.get("name")
        if gpu is None or used is None:
            problems.append(f"processes[{i}]: expected gpu (0-63) and used_bytes (bytes)")
        elif (pid is None) == (not isinstance(cgroup, str) or not cgroup.startswith("/")):
            problems.append(f'processes[{i}]: expected a pid or a cgroup path ("/system.slice/x.service"), not both')
        elif pid is None and system_cgroup(cgroup) != cgroup:
            problems.append(
                f"processes[{i}]: cgroup: expected a path that ends at its first unit ({system_cgroup(cgroup)}), "
                f"got {short_repr(cgroup)}: a process below a unit is that unit's"
            )
        elif name is not None and not isinstance(name, str):
            problems.append(f"processes[{i}]: name: expected a string, got {short_repr(name)}")
        else:
            out.append(RealProcess(gpu, used, pid, cgroup if pid is None else None, name))
    return out, problems


def _cgroup_of(pid: int, proc: Path) -> str | None:
    try:
        with open(proc / str(pid) / "cgroup", "rb") as handle:
            lines = handle.read(8192).decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    return lines[-1].split(":", 2)[-1] if lines else None


def _comm(pid: int, proc: Path) -> str | None:
    try:
        return (proc / str(pid) / "comm").read_text(errors="replace").strip() or None
    except OSError:
        return None


class RealProcessesFile:
    """The processes file of a simulated backend; see the module docstring."""

    def __init__(self, path: Path, proc: Path = Path("/proc"), euid: int | None = None) -> None:
        self.path = path
        self.proc = proc
        self.euid = os.geteuid() if euid is None else euid
        self.warning: str | None = None
        self._told: str | None = None  # the warning last handed out by new_warnings
        self._key: tuple[int, int, int] | None = None
        self._entries: list[RealProcess] = []

    def _refresh(self) -> None:
        try:
            info = os.stat(self.path)
        except OSError:
            self._key, self._entries = None, []
            return
        key = (info.st_ino, info.st_size, info.st_mtime_ns)
        if key == self._key:
            return
        self._key = key
        untrusted = root_trust_problems(info) if self.euid == 0 else []
        if untrusted:
            self._entries = []
            self.warning = f"{self.path}: " + " and ".join(untrusted) + ": ignored (chown root:root, chmod go-w)"
            return
        try:
            data, _raw = read_json(self.path)
        except (FileNotFoundError, UnusableFile) as exc:
            self._entries, self.warning = [], f"{self.path}: {exc}"
            return
        self._entries, problems = parse_entries(data)
        self.warning = f"{self.path}: " + "; ".join(problems[:5]) if problems else None

    def new_warnings(self) -> tuple[str, ...]:
        """The warning about the file if it is new since the last call (each one once), else ()."""
        if self.warning == self._told:
            return ()
        self._told = self.warning
        return () if self.warning is None else (self.warning,)

    def processes(self, gpu_count: int) -> dict[int, list[ProcessReading]]:
        """The processes that exist now, by GPU index (entries for other GPUs are ignored)."""
        self._refresh()
        out: dict[int, list[ProcessReading]] = {}
        cgroups = {e.cgroup for e in self._entries if e.cgroup is not None}
        members: dict[str, list[int]] = {c: [] for c in cgroups}
        if cgroups:
            for name in os.listdir(self.proc):
                if name.isdigit():
                    cgroup = system_cgroup(_cgroup_of(int(name), self.proc)) or ""
                    for wanted in cgroups:
                        if cgroup == wanted or cgroup.endswith(wanted):
                            members[wanted].append(int(name))
        for entry in self._entries:
            if entry.gpu >= gpu_count:
                continue
            pids = members.get(entry.cgroup, []) if entry.cgroup is not None else [entry.pid or 0]
            for pid in sorted(pids):
                if not (self.proc / str(pid)).exists():
                    continue
                out.setdefault(entry.gpu, []).append(
                    ProcessReading(pid, entry.used_bytes, entry.name or _comm(pid, self.proc))
                )
        return out
