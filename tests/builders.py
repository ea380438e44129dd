"""Builders of governor objects shared by test modules (no test module imports another).

- a daemon: :func:`build_daemon` (the one place tests call the Daemon constructor through,
  a thin call of today's constructor), :func:`scripted_daemon`, :class:`StopAt`,
  :func:`scrape_after_ticks`; conftest.py offers the first two as fixtures;
- process facts: :func:`process_facts` (keyword arguments, so a change of ProcessFacts'
  fields is made here once);
- real child processes on a simulated GPU: :class:`Harness`, :func:`spawn`, :func:`wait_exit`,
  :data:`SLEEPER`, :func:`classes_toml`; on two scripted GPUs: :class:`TwoGpus`,
  :func:`two_gpu_governor`;
- traces: :func:`write_trace` (a hand-made one-card trace for replay and plot tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from structlog.testing import capture_logs

from governor.backends import Backend
from governor.backends.nvml import NvmlBackend
from governor.backends.simulated import SimulatedBackend, build_simulated_backend
from governor.clock import Clock, VirtualClock
from governor.config import Config, SimulationConfig, parse_config
from governor.core import Governor, open_originals
from governor.daemon import STOP, Daemon, VirtualWaiter, Waiter
from governor.metrics import build_registry
from governor.model import ActionResult, GpuInfo, GpuReading, ProcessReading, Snapshot
from governor.notify import Notifier
from governor.policy import VramPolicy
from governor.processes import ProcessFacts
from governor.sim import load_profile
from governor.sim.scenario import parse_scenario
from governor.trace import device_record, sample_record, write_records
from tests.fake_pynvml import FakeGpu, FakeMig, FakeNvml
from tests.scripted import ScriptedBackend

GiB = 2**30


# ----------------------------------------------------------------------------- daemons


def build_daemon(
    config: Config,
    backend: Backend,
    clock: Clock,
    *,
    waiter: Waiter | None = None,
    notifier: Notifier | None = None,
    **options: Any,
) -> Daemon:
    """A daemon as tests build one: today's constructor, with a VirtualWaiter on a virtual
    ``clock`` and a Notifier (systemd's socket, when the test sets one) by default; ``options``
    (config_path, metrics_server_factory, load, inspector) are passed on."""
    if waiter is None and isinstance(clock, VirtualClock):
        waiter = VirtualWaiter(clock)
    return Daemon(config, backend, clock, waiter=waiter, notifier=notifier or Notifier(), **options)


class StopAt(VirtualWaiter):
    """A virtual waiter that asks the loop to stop once virtual time reaches ``stop_s``."""

    def __init__(self, clock: VirtualClock, stop_s: float) -> None:
        super().__init__(clock)
        self.clock = clock
        self.stop_s = stop_s

    def wait(self, deadline_s: float) -> list[str]:
        """Stop instead of waiting past ``stop_s``."""
        if deadline_s > self.stop_s:
            return [STOP]
        return super().wait(deadline_s)


def scripted_daemon(
    state_dir: Path,
    script: Callable[[float, int], float | None] = lambda t, i: 50.0,
    *,
    gpu_count: int = 1,
    stop_s: float | None = None,
    **config: Any,
) -> tuple[Daemon, ScriptedBackend, VirtualClock]:
    """A daemon on ``gpu_count`` scripted GPUs (temperature ``script(t_s, index)``, °C) and a
    virtual clock, its state in ``state_dir``; with ``stop_s`` its loop stops at that virtual time."""
    clock = VirtualClock()
    backend = ScriptedBackend(clock, script, gpu_count=gpu_count)
    waiter = None if stop_s is None else StopAt(clock, stop_s)
    daemon = build_daemon(Config(state_dir=str(state_dir), **config), backend, clock, waiter=waiter)
    return daemon, backend, clock


def scrape_after_ticks(tmp_path: Path, ticks: int, gpu_count: int = 2) -> tuple[Daemon, str]:
    """A started daemon (GPU 0 at 80 °C, the others at 50 °C) after ``ticks`` one-second ticks, and its scrape."""
    daemon, _, clock = scripted_daemon(tmp_path, lambda t, i: 80.0 if i == 0 else 50.0, gpu_count=gpu_count)
    daemon.start()
    for _ in range(ticks):
        clock.advance(1.0)
        daemon.tick()
    return daemon, generate_latest(build_registry(lambda: daemon.published)).decode()


def full_exposition(tmp_path: Path, profile: str) -> str:
    """The scrape of a daemon on two simulated GPUs of ``profile`` after a minute of a hot,
    power-capped load with one process each: decisions and actions on both, GPU 1 without
    a temperature from t=20 s (read errors), an XID 48 on GPU 0, per-process metrics on."""

    scenario = parse_scenario(
        {
            "name": "everything",
            "ambient_c": 50.0 if profile == "h100-80gb" else 35.0,  # hot, not shut down
            "initial_power_fraction": 1.0,
            "repeat": False,
            "phase": [{"name": "burn", "duration_s": 3600.0, "demand_fraction": 1.3}],
            "process": [{"name": "trainer", "memory_gib": 2.0}],
            "event": [{"at_s": 5.0, "gpu": 0, "xid": 48}, {"at_s": 20.0, "gpu": 1, "fault": "temperature_unsupported"}],
        },
        "<test>",
    )
    clock = VirtualClock()
    backend = SimulatedBackend(load_profile(profile), scenario, clock, gpu_count=2)
    config = Config(state_dir=str(tmp_path), runtime_dir="", vram=VramPolicy(per_process_metrics=True))
    return exposition_after(config, backend, clock, 60)


def exposition_after(config: Config, backend: Backend, clock: VirtualClock, seconds: int) -> str:
    """The scrape (text format) of a daemon on ``backend`` after ``seconds`` one-second ticks."""
    daemon = build_daemon(config, backend, clock)
    daemon.start()
    for _ in range(seconds):
        clock.advance(1.0)
        daemon.tick()
    return generate_latest(build_registry(lambda: daemon.published)).decode()


# ----------------------------------------------------------------------------- process facts


def listing(*procs: tuple[int, int | None], used: int = 6 * GiB, total: int = 12 * GiB) -> GpuReading:
    """GPU-0 with ``used`` of ``total`` bytes in use, listing ``procs`` as (pid, used bytes; None: unreported)."""
    return GpuReading(
        index=0,
        uuid="GPU-0",
        memory_used_bytes=used,
        memory_total_bytes=total,
        processes=tuple(ProcessReading(pid=p, used_memory_bytes=u) for p, u in procs),
    )


def process_facts(
    pid: int,
    klass: str = "default",
    *,
    start_time: int | None = 1000,
    name: str | None = "p",
    uid: int | None = 0,
    user: str | None = "root",
    protected: str | None = None,
    why: str = "test",
    **fields: Any,
) -> ProcessFacts:
    """The facts /proc would give for ``pid``, classified as ``klass`` (other fields: exe, cmdline,
    cgroup, unit, slices, kernel_thread, system_exe, newer_than_listing, unresolved)."""
    values: dict[str, Any] = {
        "exe": None,
        "cmdline": None,
        "cgroup": None,
        "unit": None,
        "slices": (),
        "kernel_thread": False,
        **fields,
    }
    return ProcessFacts.of(
        pid=pid,
        start_time=start_time,
        name=name,
        uid=uid,
        user=user,
        klass=klass,
        why=why,
        protected=protected,
        **values,
    )


# ----------------------------------------------------------------------------- real child processes

SLEEPER = "import time\nprint('ready', flush=True)\ntime.sleep(120)"


def spawn(children: list[subprocess.Popen[bytes]], code: str, tag: str) -> subprocess.Popen[bytes]:
    """Start a child and wait until it has exec'd and set itself up (it prints ``ready``)."""
    child = subprocess.Popen([sys.executable, "-c", code, tag], stdout=subprocess.PIPE)
    children.append(child)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == b"ready"
    return child


def wait_exit(child: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int | None:
    """The child's exit status, or None if it is still running after ``timeout_s``."""
    try:
        return child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


class Harness:
    """A daemon on a simulated GPU, stepped one virtual second at a time, reporting real children."""

    def __init__(self, tmp_path: Path, toml: dict[str, Any]) -> None:
        self.clock = VirtualClock()
        cfg = parse_config(toml, "test.toml")
        sim = SimulationConfig(profile="rtx4070", scenario="idle")
        self.backend: SimulatedBackend = build_simulated_backend(sim, self.clock)
        config = Config(state_dir=str(tmp_path), runtime_dir=str(tmp_path), vram=cfg.vram, backend="simulated")
        self.daemon = build_daemon(config, self.backend, self.clock)
        self.attached: dict[int, subprocess.Popen[bytes]] = {}

    def attach(self, child: subprocess.Popen[bytes], used_bytes: int) -> None:
        """Report ``child`` on GPU 0 using ``used_bytes`` of VRAM."""
        self.backend.attach_process(0, child.pid, used_bytes)
        self.attached[child.pid] = child

    def step(self, seconds: int) -> None:
        """Tick once per virtual second; an exited child stops being reported (as with NVML)."""
        for _ in range(seconds):
            self.clock.advance(1.0)
            self.daemon.tick()
            time.sleep(0.02)  # let real signals land
            for pid, child in list(self.attached.items()):
                if child.poll() is not None:
                    self.backend.detach_process(pid)
                    del self.attached[pid]


def classes_toml(**vram: Any) -> dict[str, Any]:
    """[vram] (2 GiB reserve, ``vram`` on top) and two classes matched by command-line markers and
    this test's uid: primary (6 GiB, grace 1 h) and secondary (3 GiB, grace 10 s, kill after 5 s)."""
    return {
        "vram": {"reserve": "2GiB", "cooldown_s": 5.0, **vram},
        "class": [
            {
                "name": "primary",
                "budget": "6GiB",
                "priority": 100,
                "action": "terminate",
                "grace_s": 3600.0,
                "match": {"cmdline": "primary-marker", "user": os.getuid()},
            },
            {
                "name": "secondary",
                "budget": "3GiB",
                "priority": 50,
                "action": "terminate",
                "grace_s": 10.0,
                "kill_after_s": 5.0,
                "match": {"cmdline": "secondary-marker", "user": os.getuid()},
            },
        ],
    }


class TwoGpus(ScriptedBackend):
    """Two scripted GPUs that list the processes a test puts on them (pid -> used bytes, per GPU)."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock, lambda _t, _i: 50.0, gpu_count=2)
        self.on: list[dict[int, int]] = [{}, {}]

    def read(self) -> Snapshot:
        """The scripted readings with this tick's processes."""
        snap = super().read()
        gpus = tuple(
            GpuReading(
                index=r.index,
                uuid=r.uuid,
                temperature_c=r.temperature_c,
                power_w=r.power_w,
                power_limit_w=r.power_limit_w,
                memory_used_bytes=r.memory_used_bytes,
                memory_total_bytes=r.memory_total_bytes,
                processes=tuple(ProcessReading(pid, used) for pid, used in self.on[r.index].items()),
            )
            for r in snap.gpus
        )
        return Snapshot(t_s=snap.t_s, wall_time_s=snap.wall_time_s, gpus=gpus)


def two_gpu_governor(tmp_path: Path) -> tuple[Governor, TwoGpus, VirtualClock]:
    """A governor on two scripted GPUs with the shared test classes (secondary: 3 GiB, grace 10 s, kill after 5 s)."""
    clock = VirtualClock()
    backend = TwoGpus(clock)
    vram = parse_config(classes_toml(), "test.toml").vram
    cfg = Config(state_dir=str(tmp_path / "state"), runtime_dir=str(tmp_path / "run"), vram=vram)
    return Governor(cfg, backend, open_originals(cfg)), backend, clock


# ----------------------------------------------------------------------------- traces

REPLAY_CARD = GpuInfo(
    index=0,
    uuid="GPU-replay-0",
    name="Replay Card",
    power_limit_min_w=100.0,
    power_limit_max_w=220.0,
    power_limit_default_w=200.0,
    memory_total_bytes=12 * GiB,
)
"""The one card of :func:`write_trace`."""


def replay_temperature_at(t: int) -> float:
    """60 °C, then 76 °C at t = 5-7 s (three hot samples), 80 °C at t = 8 s, then 60 °C to the end."""
    if 5 <= t <= 7:
        return 76.0
    return 80.0 if t == 8 else 60.0


def write_trace(path: Path) -> None:
    """81 samples at 1 Hz of one 200 W card; 'leaky' grows from 1 GiB to 4 GiB at t = 20 s."""
    records = [device_record(REPLAY_CARD, 1.0, "hand-made")]
    for t in range(81):
        processes = (
            ProcessReading(pid=100, used_memory_bytes=(4 if t >= 20 else 1) * GiB, name="leaky"),
            ProcessReading(pid=200, used_memory_bytes=2 * GiB, name="other"),
        )
        reading = GpuReading(
            index=0,
            uuid=REPLAY_CARD.uuid,
            temperature_c=replay_temperature_at(t),
            power_w=150.0,
            power_limit_w=200.0,
            memory_used_bytes=7 * GiB,
            memory_total_bytes=12 * GiB,
            processes=processes,
        )
        records.append(sample_record(float(t), reading))
    with open(path, "w", encoding="utf-8") as handle:
        write_records(handle, records)


def step_ticks(governor: Governor, clock: VirtualClock, count: int) -> list[ActionResult]:
    """``count`` governor steps one second apart on fresh readings; every action result."""
    results: list[ActionResult] = []
    for _ in range(count):
        clock.advance(1.0)
        results += governor.step(governor.read()).results
    return results


MIG_A = "MIG-aaaaaaaa-0000-0000-0000-000000000000"
MIG_B = "MIG-bbbbbbbb-0000-0000-0000-000000000000"


def mig_daemon(tmp_path: Path, gpu: FakeGpu, seconds: int = 3) -> tuple[str, list[MutableMapping[str, Any]]]:
    """The scrape and the log events of a daemon on one fake GPU (NVML backend, [vram] reserve 2 GiB) after
    ``seconds`` one-second ticks."""
    clock = VirtualClock()
    backend = NvmlBackend(clock, nvml=FakeNvml([gpu]), proc_root=tmp_path)
    config = Config(state_dir=str(tmp_path), runtime_dir="", vram=VramPolicy(reserve_bytes=2 * GiB))
    daemon = build_daemon(config, backend, clock)
    with capture_logs() as logs:
        daemon.start()
        for _ in range(seconds):
            clock.advance(1.0)
            daemon.tick()
    return generate_latest(build_registry(lambda: daemon.published)).decode(), logs


def full_mig_gpu() -> FakeGpu:
    """GPU-0 in MIG mode with two instances: MIG_A (19 of 20 GiB used: under pressure) and MIG_B (10 of 40 GiB)."""
    return FakeGpu(
        uuid="GPU-0",
        mig_mode=1,
        mig_devices=[
            FakeMig(uuid=MIG_A, memory_total=20 * GiB, memory_used=19 * GiB),
            FakeMig(uuid=MIG_B, memory_total=40 * GiB, memory_used=10 * GiB),
        ],
    )
