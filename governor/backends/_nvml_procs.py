"""NVML process listing: compute and graphics process entries as one ProcessReading per pid."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from governor.model import GpuReading, ProcessReading

NOT_AVAILABLE_BYTES: Final = 1 << 63
"""usedGpuMemory at or above this is NVML's "not available" marker (2**64 - 1)."""


class ProcessLister:
    """Merges NVML's process lists and names each pid from ``<proc_root>/<pid>/comm``.

    Names are cached while a pid is on a GPU (:meth:`prune` forgets the others, so a
    reused pid is looked up again).
    """

    __slots__ = ("_names", "_proc_root")

    def __init__(self, proc_root: Path) -> None:
        self._proc_root = proc_root
        self._names: dict[int, str | None] = {}

    def processes(
        self, compute: Any, graphics: Any, total_bytes: int | None = None
    ) -> tuple[ProcessReading, ...] | None:
        """Compute and graphics processes, one entry per pid with its largest memory use in
        bytes (None memory when NVML cannot say, or says more than the GPU's ``total_bytes``).

        None (unknown) when the compute list is not available: the processes a budget is
        about would be missing, and a partial or empty list would read as processes gone
        (their escalation reset, their class's usage 0). A missing graphics list (cards
        without graphics, or a call that failed this tick) leaves the compute processes."""
        if compute is None:
            return None
        if not compute and not graphics:
            return ()  # the usual answer of an idle GPU: no list to build
        entries = list(compute or ()) + list(graphics or ())
        above = NOT_AVAILABLE_BYTES if total_bytes is None else min(total_bytes + 1, NOT_AVAILABLE_BYTES)
        used_by_pid: dict[int, int | None] = {}
        for entry in entries:
            pid = int(entry.pid)
            used = entry.usedGpuMemory
            used = None if used is None or used >= above else int(used)
            if pid in used_by_pid:
                known = used_by_pid[pid]
                if known is None or (used is not None and used > known):
                    used_by_pid[pid] = used
            else:
                used_by_pid[pid] = used
        name = self._name
        return tuple(ProcessReading(pid=p, used_memory_bytes=u, name=name(p)) for p, u in used_by_pid.items())

    def _name(self, pid: int) -> str | None:
        """The process's command name from /proc/PID/comm, cached while the pid is on a GPU."""
        names = self._names
        if pid in names:
            return names[pid]
        try:
            name: str | None = (self._proc_root / str(pid) / "comm").read_text(errors="replace").rstrip("\n")
        except OSError:
            name = None
        names[pid] = name
        return name

    def prune(self, readings: Iterable[GpuReading]) -> None:
        """Forget the names of pids no longer on any GPU."""
        if not self._names:
            return
        seen = {p.pid for r in readings if r.processes for p in r.processes}
        for pid in [pid for pid in self._names if pid not in seen]:
            del self._names[pid]
