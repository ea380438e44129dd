"""[simulation] processes_file: real processes (by pid or cgroup) on a simulated GPU, as NVML would list them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from governor.backends._sim_processes import RealProcessesFile, parse_entries
from governor.backends.simulated import SimulatedBackend, build_simulated_backend
from governor.clock import VirtualClock
from governor.config import Config, SimulationConfig
from governor.core import Governor, open_originals
from governor.observers import DecisionLog

GIB = 2**30


def fake_proc(root: Path, pids: dict[int, str]) -> Path:
    """A /proc with the given pids, each in the given cgroup (cgroup v2 and a v1 line first)."""
    for pid, cgroup in pids.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cgroup").write_text(f"12:cpu:/\n0::{cgroup}\n")
        (root / str(pid) / "comm").write_text(f"proc{pid}\n")
    return root


def write(path: Path, entries: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps({"processes": entries}))
    return path


class TestRealProcessesFile:
    def test_cgroup_and_pid_entries_report_what_exists(self, tmp_path: Path) -> None:
        """A cgroup entry lists every process in it (a container's suffix too); a pid entry only while it exists."""
        proc = fake_proc(
            tmp_path / "proc",
            {
                10: "/system.slice/a.service",
                11: "/machine.slice/x/system.slice/a.service",
                12: "/system.slice/b.service",
            },
        )
        path = write(
            tmp_path / "p.json",
            [
                {"cgroup": "/system.slice/a.service", "used_bytes": GIB},
                {"pid": 12, "used_bytes": 2 * GIB, "name": "bee"},
                {"pid": 99, "used_bytes": GIB},
                {"gpu": 1, "pid": 12, "used_bytes": GIB},
            ],
        )
        found = RealProcessesFile(path, proc).processes(gpu_count=1)
        assert [(p.pid, p.used_memory_bytes, p.name) for p in found[0]] == [
            (10, GIB, "proc10"),
            (11, GIB, "proc11"),
            (12, 2 * GIB, "bee"),
        ]
        assert 1 not in found  # only one GPU

    def test_changes_are_read_again_and_exits_drop_out(self, tmp_path: Path) -> None:
        """A rewritten file is read again; a process whose /proc entry is gone is no longer listed."""
        proc = fake_proc(tmp_path / "proc", {10: "/system.slice/a.service"})
        path = write(tmp_path / "p.json", [{"pid": 10, "used_bytes": GIB}])
        real = RealProcessesFile(path, proc)
        assert [p.pid for p in real.processes(1)[0]] == [10]
        write(path, [{"pid": 10, "used_bytes": 3 * GIB}])
        os.utime(path, ns=(1, 1))  # a new mtime even within the same clock tick
        assert [p.used_memory_bytes for p in real.processes(1)[0]] == [3 * GIB]
        (proc / "10" / "cgroup").unlink()
        (proc / "10" / "comm").unlink()
        (proc / "10").rmdir()
        assert real.processes(1) == {}

    def test_bad_entries_are_dropped_with_a_warning(self, tmp_path: Path) -> None:
        """Malformed entries are skipped and named; an unusable file reports no process."""
        entries, problems = parse_entries(
            {
                "processes": [
                    {"pid": 1, "cgroup": "/x", "used_bytes": 1},
                    {"used_bytes": -1, "pid": 3},
                    "x",
                    {"pid": 5, "used_bytes": 7},
                ]
            }
        )
        assert [e.pid for e in entries] == [5] and len(problems) == 3
        (tmp_path / "bad.json").write_text("{nope")
        real = RealProcessesFile(tmp_path / "bad.json", tmp_path)
        assert real.processes(1) == {} and real.warning is not None


class TestCgroupRule:
    def test_a_process_belongs_to_the_first_unit_of_its_cgroup(self, tmp_path: Path) -> None:
        """As the governor decides units: a process below a Delegate=yes unit named after a.service is not
        a.service's, one in a child cgroup of a.service is, and a container's prefix without a unit still matches."""
        proc = fake_proc(
            tmp_path / "proc",
            {
                10: "/system.slice/a.service",
                11: "/user.slice/user-1000.slice/user@1000.service/system.slice/a.service",
                12: "/system.slice/a.service/worker",
                13: "/machine.slice/x/system.slice/a.service",
                14: "/system.slice/ci.service/system.slice/a.service",
                15: "/system.slice/b.service",
            },
        )
        path = write(tmp_path / "p.json", [{"cgroup": "/system.slice/a.service", "used_bytes": GIB}])
        found = RealProcessesFile(path, proc).processes(gpu_count=1)
        assert [p.pid for p in found[0]] == [10, 12, 13]

    def test_an_entry_below_a_unit_is_refused(self) -> None:
        """A cgroup entry that goes on below its first unit could never match: refused, naming the unit's path."""
        entries, problems = parse_entries(
            {"processes": [{"cgroup": "/system.slice/ci.service/system.slice/a.service", "used_bytes": 1}]}
        )
        assert entries == [] and len(problems) == 1
        assert "processes[0]: cgroup" in problems[0] and "(/system.slice/ci.service)" in problems[0]


def test_simulated_gpu_charges_the_real_processes(tmp_path: Path) -> None:
    """The simulated GPU lists the file's live processes and counts their VRAM as used."""
    path = write(tmp_path / "p.json", [{"pid": os.getpid(), "used_bytes": 2 * GIB, "name": "me"}])
    clock = VirtualClock()
    plain = build_simulated_backend(SimulationConfig(scenario="idle"), clock)
    backend = build_simulated_backend(SimulationConfig(scenario="idle", processes_file=str(path)), clock)
    assert isinstance(backend, SimulatedBackend)
    before, after = plain.read().gpus[0], backend.read().gpus[0]
    assert after.processes is not None and [(p.pid, p.name) for p in after.processes] == [(os.getpid(), "me")]
    assert before.memory_used_bytes is not None and after.memory_used_bytes == before.memory_used_bytes + 2 * GIB


def test_root_ignores_a_processes_file_others_can_write(tmp_path: Path) -> None:
    """As root, a processes file writable by others (or not root's) names no process: it could aim signals."""
    path = write(tmp_path / "p.json", [{"pid": os.getpid(), "used_bytes": 2 * GIB}])
    path.chmod(0o666)
    real = RealProcessesFile(path, euid=0)
    assert real.processes(1) == {}
    assert real.warning is not None and "writable by group or others" in real.warning
    path.chmod(0o644)
    trusted_owner = os.stat(path).st_uid == 0
    assert bool(RealProcessesFile(path, euid=0).processes(1)) is trusted_owner
    assert RealProcessesFile(path, euid=1000).processes(1) != {}  # not root: no owner rule


def test_an_ignored_processes_file_reaches_the_decision_log_once(tmp_path: Path) -> None:
    """A processes file the backend cannot use is logged as backend_input_ignored once, not every tick."""
    path = tmp_path / "p.json"
    path.write_text("{nope")
    path.chmod(0o644)
    clock = VirtualClock()
    backend = build_simulated_backend(SimulationConfig(scenario="idle", processes_file=str(path)), clock)
    first, second = backend.read(), backend.read()
    assert len(first.notes) == 1 and str(path) in first.notes[0] and second.notes == ()
    config = Config(state_dir=str(tmp_path / "state"), runtime_dir="")
    governor = Governor(config, backend, open_originals(config))
    with capture_logs() as logs:
        log = DecisionLog(structlog.get_logger())
        log.observe(governor.step(first, clock.wall()))
        log.observe(governor.step(second, clock.wall()))
    events = [e for e in logs if e["event"] == "backend_input_ignored"]
    assert [e["detail"] for e in events] == list(first.notes)
    write(path, [{"pid": os.getpid(), "used_bytes": GIB}])  # mended: the next problem is news again
    assert backend.read().notes == ()
    path.write_text("[]")
    assert len(backend.read().notes) == 1
