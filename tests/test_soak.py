"""Soak: 24 simulated hours at 10 Hz through the whole daemon, per shipped scenario, with no memory growth.

Each scenario runs the real :class:`~governor.daemon.Daemon` loop (read, classify, rules, actuator with
power limits really set on the simulated GPUs, process table, publish) on a virtual clock, logging in
journal format to a sink that keeps only counts, and scraping the metrics once per simulated hour.
Memory is checked twice:

* RSS (``/proc/self/statm``, resident now, not the peak) after hour 1 against after hour 24;
* tracemalloc from hour 1 on: Python memory still held at hour 3 against hour 1 h 10 min (when every
  object replaced tick after tick has been replaced at least once under tracing).

Run with ``-s`` (or ``-rP``) to see the numbers per scenario.
"""

from __future__ import annotations

import gc
import io
import json
import os
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from governor.backends.simulated import SimulatedBackend, build_simulated_backend
from governor.clock import VirtualClock
from governor.config import Config, PowerPolicy, SimulationConfig, parse_config
from governor.daemon import STOP, Daemon, VirtualWaiter
from governor.logsetup import configure
from governor.metrics import build_registry
from governor.model import GpuHealth
from governor.notify import Notifier

HOUR_S = 3600.0
SOAK_S = 24 * HOUR_S
POLL_S = 0.1
TICKS = 864_000  # 24 h at 10 Hz
MiB = 2**20
KiB = 2**10
RSS_GROWTH_MAX_BYTES = 4 * MiB
TRACED_GROWTH_MAX_BYTES = 256 * KiB
TRACE_FROM_S = 1 * HOUR_S
TRACE_WARM_S = TRACE_FROM_S + 600.0
TRACE_UNTIL_S = 3 * HOUR_S

GPU_COUNT = {"gpu-lost": 2}
"""Scenarios that need more than one GPU (gpu-lost loses GPU 1 at t = 120 s)."""
SCENARIOS = ("sustained-inference", "hot", "idle", "dual-inference-game", "leaky-process", "gpu-lost")

CLASSES: dict[str, Any] = {
    "vram": {"reserve": "1GiB", "cooldown_s": 30.0, "per_process_metrics": True},
    "class": [
        {"name": "primary", "budget": "6GiB", "priority": 100, "action": "terminate", "match": {"name": "primary"}},
        {"name": "secondary", "budget": "3GiB", "priority": 50, "action": "terminate", "match": {"name": "secondary"}},
        {"name": "game", "budget": "4GiB", "priority": 80, "action": "observe", "match": {"name": "game"}},
        {"name": "server", "budget": "10GiB", "priority": 100, "action": "terminate", "match": {"name": "llm-server"}},
        {"name": "trainer", "budget": "6GiB", "priority": 10, "action": "kill", "match": {"name": "trainer"}},
        {
            "name": "leaky",
            "budget": "3GiB",
            "priority": 10,
            "action": "terminate",
            "grace_s": 10.0,
            "kill_after_s": 5.0,
            "match": {"name": "leaky"},
        },
        {"name": "steady", "budget": "3GiB", "priority": 50, "action": "terminate", "match": {"name": "steady"}},
        {"name": "worker", "budget": "6GiB", "priority": 50, "action": "terminate", "match": {"name": "worker"}},
    ],
}
"""A class for every scenario process: trainer (8 GiB of 6) and leaky (up to 8 GiB of 3) go over budget.

Scenario processes have synthetic PIDs (above PID_MAX_LIMIT): no start time can be read for them, so
the VRAM rule reports them over budget and never signals them."""

pytestmark = pytest.mark.soak


def rss_bytes() -> int:
    """Resident set size of this process now (second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class LineSink(io.TextIOBase):
    """A log stream that keeps only counts: lines per event name and per syslog priority."""

    def __init__(self) -> None:
        super().__init__()
        self.events: Counter[str] = Counter()
        self.priorities: Counter[int] = Counter()
        self.bad_lines = 0
        self._partial = ""

    def writable(self) -> bool:
        """Always writable."""
        return True

    def write(self, text: str) -> int:
        """Take text as printed (the line and its newline may come in separate writes) and count whole lines."""
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._count(line)
        return len(text)

    def _count(self, line: str) -> None:
        """Count one journal line (``<N>event key=value ...``); a line not of that form is counted bad."""
        if not line.startswith("<") or ">" not in line or not line.isprintable():
            self.bad_lines += 1
            return
        priority, _, rest = line[1:].partition(">")
        self.priorities[int(priority)] += 1
        self.events[rest.split(" ", 1)[0]] += 1


class SoakWaiter(VirtualWaiter):
    """A virtual waiter that runs hooks once virtual time reaches their marks, and stops the loop at ``stop_s``."""

    def __init__(self, clock: VirtualClock, stop_s: float, hooks: list[tuple[float, Callable[[], None]]]) -> None:
        super().__init__(clock)
        self.clock = clock
        self.stop_s = stop_s
        self.hooks = sorted(hooks, key=lambda hook: hook[0])

    def wait(self, deadline_s: float) -> list[str]:
        """Run the hooks now due (all the rest at the end), then stop past ``stop_s`` or jump to the deadline."""
        stopping = deadline_s > self.stop_s
        while self.hooks and (stopping or self.hooks[0][0] <= self.clock.monotonic()):
            self.hooks.pop(0)[1]()
        if stopping:
            return [STOP]
        return super().wait(deadline_s)


@dataclass
class SoakResult:
    """What one soak measured."""

    scenario: str
    rss_bytes: dict[str, int] = field(default_factory=dict)
    traced_bytes: dict[str, int] = field(default_factory=dict)
    traced_top: list[str] = field(default_factory=list)
    hourly_rss_bytes: list[int] = field(default_factory=list)
    scrapes: int = 0
    lost_gpu_checks: list[tuple[float, GpuHealth, float | None]] = field(default_factory=list)


def soak_config(tmp_path: Path, scenario: str) -> Config:
    """The soak's config: 10 Hz, enforcing (not dry-run), VRAM classes; gpu-lost steps GPU 0 down after the loss."""
    vram = parse_config(CLASSES, "soak.toml").vram
    power = PowerPolicy(step_down_at_c=70.0, step_up_at_c=60.0) if scenario == "gpu-lost" else PowerPolicy()
    return Config(
        source="soak.toml",
        poll_interval_s=POLL_S,
        dry_run=False,
        backend="simulated",
        state_dir=str(tmp_path / "state"),
        runtime_dir=str(tmp_path),
        power=power,
        vram=vram,
        simulation=SimulationConfig(profile="rtx4070", scenario=scenario, gpu_count=GPU_COUNT.get(scenario, 1)),
    )


@pytest.fixture(autouse=True)
def _no_systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)
    yield
    if tracemalloc.is_tracing():  # a failed hook must not leave tracing on for the tests after
        tracemalloc.stop()


def run_soak(tmp_path: Path, scenario: str, sink: LineSink) -> tuple[Daemon, SimulatedBackend, SoakResult]:
    """Run one scenario for 24 simulated hours with the measuring hooks."""
    configure("journal", stream=sink)  # type: ignore[arg-type]  # a TextIOBase is a text stream
    (tmp_path / "state").mkdir()
    config = soak_config(tmp_path, scenario)
    clock = VirtualClock()
    backend = build_simulated_backend(config.simulation, clock)
    result = SoakResult(scenario)
    hooks: list[tuple[float, Callable[[], None]]] = []
    daemon: Daemon | None = None

    def scrape() -> None:
        assert daemon is not None
        published = daemon.published
        text = generate_latest(build_registry(lambda: published)).decode("utf-8")
        names = {family.name for family in text_string_to_metric_families(text)}
        assert "gpu_governor_gpu_temperature_celsius" in names
        result.scrapes += 1

    def hourly() -> None:
        scrape()
        result.hourly_rss_bytes.append(rss_bytes())
        if scenario == "gpu-lost":
            assert daemon is not None and daemon.snapshot is not None
            gpu0, gpu1 = daemon.snapshot.gpus
            result.lost_gpu_checks.append((daemon.snapshot.t_s, gpu1.health, gpu0.temperature_c))

    def measure_rss(label: str) -> Callable[[], None]:
        def hook() -> None:
            gc.collect()
            result.rss_bytes[label] = rss_bytes()

        return hook

    def trace_start() -> None:
        gc.collect()
        tracemalloc.start()
        result.traced_bytes["start"] = tracemalloc.get_traced_memory()[0]

    warm: list[tracemalloc.Snapshot] = []

    def trace_warm() -> None:
        gc.collect()
        warm.append(tracemalloc.take_snapshot())  # kept alive until the end: counted in both readings
        result.traced_bytes["warm"] = tracemalloc.get_traced_memory()[0]

    def trace_end() -> None:
        gc.collect()
        result.traced_bytes["end"] = tracemalloc.get_traced_memory()[0]
        end = tracemalloc.take_snapshot()
        tracemalloc.stop()
        stats = end.compare_to(warm[0], "lineno")
        result.traced_top = [str(s) for s in stats[:8]]
        warm.clear()

    for hour in range(1, 25):
        hooks.append((hour * HOUR_S, hourly))
    hooks += [
        (TRACE_FROM_S, measure_rss("hour 1")),
        (TRACE_FROM_S, trace_start),
        (TRACE_WARM_S, trace_warm),
        (TRACE_UNTIL_S, trace_end),
        (TRACE_UNTIL_S, measure_rss("hour 3")),
        (SOAK_S, measure_rss("hour 24")),
    ]
    waiter = SoakWaiter(clock, SOAK_S, hooks)  # sorted() is stable: equal marks run in the order above
    daemon = Daemon(config, backend, clock, waiter=waiter, notifier=Notifier())
    assert daemon.run() == 0
    assert not waiter.hooks
    return daemon, backend, result


def report(result: SoakResult) -> str:
    """The numbers of one soak, for the test output."""
    rss = {k: f"{v / MiB:.2f} MiB" for k, v in result.rss_bytes.items()}
    growth = (result.rss_bytes["hour 24"] - result.rss_bytes["hour 1"]) / KiB
    traced = {k: f"{v / KiB:.1f} KiB" for k, v in result.traced_bytes.items()}
    hourly = ", ".join(f"{v / MiB:.1f}" for v in result.hourly_rss_bytes)
    return (
        f"\nsoak {result.scenario}: RSS {rss} (growth hour 1 -> 24: {growth:+.0f} KiB); "
        f"tracemalloc {traced}; hourly RSS MiB [{hourly}]"
    )


class TestSoak:
    @pytest.mark.parametrize("scenario", SCENARIOS)
    def test_24_hours_at_10_hz_without_memory_growth(self, tmp_path: Path, scenario: str) -> None:
        """24 simulated hours at 10 Hz through the daemon keep RSS within 4 MiB and traced memory within 256 KiB."""
        sink = LineSink()
        daemon, _, result = run_soak(tmp_path, scenario, sink)
        print(report(result))
        published = daemon.published
        assert published is not None
        assert published.tick_count == TICKS
        assert result.scrapes == 24
        assert sink.bad_lines == 0
        assert sink.priorities[2] == 0, f"critical events: {sink.events}"
        assert sink.events["process_inspect_failed"] == 0
        table = json.loads((tmp_path / "processes.json").read_text())["processes"]  # written from the first tick
        assert (len(table) > 0) == (scenario != "idle")

        growth = result.rss_bytes["hour 24"] - result.rss_bytes["hour 1"]
        assert growth <= RSS_GROWTH_MAX_BYTES, report(result)
        traced_growth = result.traced_bytes["end"] - result.traced_bytes["warm"]
        assert traced_growth <= TRACED_GROWTH_MAX_BYTES, report(result) + "\n" + "\n".join(result.traced_top)

        actions = dict(published.process_action_counts)
        if scenario == "leaky-process":
            assert actions[("leaky", "over_budget", "reported")] == 1
            assert sink.events["process_over_budget"] == 1
        if scenario == "hot":
            assert actions[("trainer", "over_budget", "reported")] == 1
            assert "power_step_down" in {rule for (_, _, rule, _), _ in published.decision_counts}
        if scenario == "gpu-lost":
            assert [health for _, health, _ in result.lost_gpu_checks] == [GpuHealth.LOST] * 24
            assert all(temperature is not None for *_, temperature in result.lost_gpu_checks)
        # synthetic PIDs have no start time: reported, never signalled
        assert not any(action in ("sigterm", "sigkill") for (_, action, _) in actions)

    def test_gpu_lost_leaves_the_other_gpu_governed(self, tmp_path: Path) -> None:
        """After GPU 1 is lost at 120 s, GPU 0 is still read every tick and its power limit is still stepped."""
        config = soak_config(tmp_path, "gpu-lost")
        (tmp_path / "state").mkdir()
        clock = VirtualClock()
        backend = build_simulated_backend(config.simulation, clock)
        checks: list[tuple[float, GpuHealth, GpuHealth, float | None]] = []
        daemon: Daemon | None = None

        def check() -> None:
            assert daemon is not None and daemon.snapshot is not None
            gpu0, gpu1 = daemon.snapshot.gpus
            checks.append((daemon.snapshot.t_s, gpu0.health, gpu1.health, gpu0.temperature_c))

        waiter = SoakWaiter(clock, 2 * HOUR_S, [(t, check) for t in (60.0, 300.0, HOUR_S, 2 * HOUR_S)])
        configure("journal", stream=LineSink())  # type: ignore[arg-type]  # a TextIOBase is a text stream
        daemon = Daemon(config, backend, clock, waiter=waiter, notifier=Notifier())
        assert daemon.run() == 0
        assert daemon.published is not None and daemon.published.tick_count == 2 * 36_000
        assert [(h0, h1) for _, h0, h1, _ in checks] == [
            (GpuHealth.OK, GpuHealth.OK),
            (GpuHealth.OK, GpuHealth.LOST),
            (GpuHealth.OK, GpuHealth.LOST),
            (GpuHealth.OK, GpuHealth.LOST),
        ]
        assert all(temperature is not None for *_, temperature in checks)
        published = daemon.published
        assert published is not None
        gpu0, _ = published.gpus
        assert gpu0.last_decision is not None and gpu0.last_decision.t_s > 120.0
        counts = {(gpu, *rest): n for (gpu, _, *rest), n in published.decision_counts}
        assert counts.get((0, "power_step_down", "set_power_limit"), 0) >= 1
        assert counts.get((1, "power_step_down", "set_power_limit"), 0) == 0
        applied = {(gpu, *rest): n for (gpu, _, *rest), n in published.action_counts}
        assert applied.get((0, "set_power_limit", "applied"), 0) >= 1
