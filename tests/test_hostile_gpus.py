"""Broken answers from a card: an impossible power-limit range, absurd watts, NaN readings.

The governor may only write a limit it can clamp to a range the card really has; anything
else it leaves alone (monitor-only), and no reading, however broken, stops a tick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from governor.actuator import NO_RANGE
from governor.backends.nvml import NvmlBackend
from governor.clock import VirtualClock
from governor.config import Config, parse_config, parse_toml
from governor.core import Governor, open_originals
from governor.model import (
    MAX_PLAUSIBLE_W,
    GpuHealth,
    GpuInfo,
    GpuReading,
    Outcome,
    Snapshot,
    checked_power_range,
)
from governor.rules.budget import water_fill
from tests.fake_pynvml import FakeGpu, FakeNvml
from tests.support import Branch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    parse_toml(path.read_bytes(), str(path))
    for path in [ROOT / "config" / "governor.toml", *sorted((ROOT / "config" / "examples").glob("*.toml"))]
]
"""The shipped configs (ladder, target mode, fans, node budget, classes)."""
MIN_SHARE = 0.2
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"


def nvml_backend(gpu: FakeGpu) -> tuple[NvmlBackend, FakeNvml]:
    """The real NVML adapter over a fake NVML with one GPU."""
    fake = FakeNvml([gpu])
    return NvmlBackend(VirtualClock(), nvml=fake), fake


class TestCheckedRange:
    def test_a_sane_range_is_kept(self) -> None:
        """A range of two positive watts with min <= max and a default inside it is used as NVML gave it."""
        assert checked_power_range(100.0, 220.0, 200.0) == (100.0, 220.0, 200.0, None)
        assert checked_power_range(150.0, 150.0, 150.0) == (150.0, 150.0, 150.0, None)

    def test_an_impossible_range_is_unknown(self) -> None:
        """min > max, a zero bound or NVML's all-ones 4294967.295 W make the whole range unknown, and say so."""
        for low, high in ((220.0, 100.0), (0.0, 200.0), (100.0, 4294967.295), (100.0, None)):
            low_w, high_w, default_w, why = checked_power_range(low, high, 200.0)
            assert (low_w, high_w) == (None, None)
            assert why is not None and "power limit range" in why
            assert default_w == 200.0  # a plausible default stays (the range it would be checked against is gone)

    def test_a_default_outside_the_range_is_unknown(self) -> None:
        """A default below min, above max or absurd is dropped; the range stays."""
        for default in (50.0, 300.0, 0.0, MAX_PLAUSIBLE_W):
            assert checked_power_range(100.0, 220.0, default)[:3] == (100.0, 220.0, None)


class TestNvmlAdapter:
    def test_an_inverted_range_from_nvml_is_dropped_and_logged(self) -> None:
        """A card whose constraints say min 700 W > max 200 W gets no range (never a limit set) and one warning."""
        with capture_logs() as logs:
            backend, _ = nvml_backend(FakeGpu(uuid=UUID0, limit_min_mw=700_000, limit_max_mw=200_000))
        (info,) = backend.gpus()
        assert (info.power_limit_min_w, info.power_limit_max_w) == (None, None)
        assert [e["dropped"] for e in logs if e["event"] == "nvml_value_implausible"] == [
            "power limit range 700.0-200.0 W"
        ]

    def test_all_ones_milliwatts_read_as_missing(self) -> None:
        """Power and enforced limit of 0xFFFFFFFF mW (4.3 MW) read as None, not as watts; 0 W of draw is kept."""
        backend, fake = nvml_backend(FakeGpu(uuid=UUID0, power_mw=0xFFFFFFFF, enforced_limit_mw=0xFFFFFFFF))
        (reading,) = backend.read().gpus
        assert reading.power_w is None and reading.power_limit_w is None
        fake.gpus[0].power_mw, fake.gpus[0].enforced_limit_mw = 0, 200_000
        (reading,) = backend.read().gpus
        assert reading.power_w == 0.0 and reading.power_limit_w == 200.0


def test_a_gpu_without_a_range_at_start_is_governed_once_the_card_gives_one(tmp_path: Path) -> None:
    """A hot GPU whose range read timed out at start is monitor-only (never written), and is governed once
    the adapter has read the range again (the core follows the backend's GPUs)."""
    card = FakeGpu(uuid=UUID0, temperature_c=92, errors={"nvmlDeviceGetPowerManagementLimitConstraints": 10})
    clock = VirtualClock()
    fake = FakeNvml([card])
    backend = NvmlBackend(clock, nvml=fake)
    doc = dict(CONFIGS[0], state_dir=str(tmp_path / "state"), runtime_dir="", dry_run=False)
    config = parse_config(doc, "shipped")
    governor = Governor(config, backend, open_originals(config))
    del card.errors["nvmlDeviceGetPowerManagementLimitConstraints"]  # the card answers from now on
    outcomes = []
    for _ in range(40):
        clock.advance(1.0)
        report = governor.step(governor.read())
        outcomes += [(clock.monotonic(), r.outcome, r.detail) for r in report.results if r.decision.gpu_uuid == UUID0]
    assert any(o is Outcome.REFUSED and d == f"monitor-only: {NO_RANGE}" for t, o, d in outcomes if t < 10)
    assert not any(o is Outcome.APPLIED for t, o, _ in outcomes if t < 10)
    assert card.enforced_limit_mw < 700_000, outcomes  # written once the range was known
    assert UUID0 not in governor.actuator.monitor_only


# ----------------------------------------------------------------------------- the whole step


class HostileBackend:
    """GPUs whose static facts and readings come from a hypothesis draw; every write is recorded."""

    name = "hostile"
    waiting_reason: str | None = None
    state_warning: str | None = None

    def __init__(self, infos: tuple[GpuInfo, ...], readings: list[tuple[GpuReading, ...]]) -> None:
        self.infos = infos
        self.readings = readings
        self.t_s = 0.0
        self.sets: list[tuple[str, float]] = []

    def gpus(self) -> tuple[GpuInfo, ...]:
        """The drawn GPUs."""
        return self.infos

    def read(self) -> Snapshot:
        """The next drawn readings, one second later."""
        self.t_s += 1.0
        return Snapshot(t_s=self.t_s, wall_time_s=1.7e9 + self.t_s, gpus=self.readings.pop(0))

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Record the write."""
        self.sets.append((uuid, limit_w))

    def set_fan_speed(self, uuid: str, fan: int, percent: int) -> None:
        """Fans are not this test's subject."""

    def set_fan_auto(self, uuid: str, fan: int) -> None:
        """Fans are not this test's subject."""

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class Case:
    """A shipped config, GPUs as a backend might describe them, and 40 ticks of readings."""

    config: int
    infos: tuple[GpuInfo, ...]
    ticks: tuple[tuple[GpuReading, ...], ...]


NVML_WATTS = st.sampled_from([None, 0.0, 1.0, 100.0, 150.0, 200.0, 220.0, 350.0, 700.0, 1e6, 4294967.295])
"""Watts as NVML's unsigned milliwatts can say them, sane and not."""
TEMPERATURES = st.none() | st.floats(20.0, 110.0) | st.sampled_from([0.0, 255.0, 4294967295.0, math.nan, math.inf])
POWERS = st.none() | st.floats(0.0, 800.0) | st.sampled_from([math.nan, math.inf, 1e300, 4294967.295])


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Any shipped config on one to three GPUs with any range NVML could report, read 40 times."""
    infos = []
    for i in range(draw(st.integers(1, 3))):
        low: float | None
        high: float | None
        default: float | None
        if draw(st.booleans()):  # half the cards: a range as real cards report it
            low, high, default = draw(
                st.sampled_from([(100.0, 220.0, 200.0), (200.0, 700.0, 700.0), (150.0, 150.0, 150.0)])
            )
        else:  # the others: any three values NVML's milliwatts can say, through the adapter's check
            low, high, default, _ = checked_power_range(draw(NVML_WATTS), draw(NVML_WATTS), draw(NVML_WATTS))
        infos.append(GpuInfo(i, f"GPU-{i}", draw(st.sampled_from(["NVIDIA GeForce RTX 4070", "NVIDIA H100", ""])),
                             power_limit_min_w=low, power_limit_max_w=high, power_limit_default_w=default,
                             fan_count=draw(st.sampled_from([None, 0, 1, 2]))))  # fmt: skip
    ticks = []
    for _ in range(40):
        ticks.append(
            tuple(
                GpuReading(
                    index=g.index,
                    uuid=g.uuid,
                    temperature_c=draw(TEMPERATURES),
                    power_w=draw(POWERS),
                    power_limit_w=draw(st.none() | NVML_WATTS.filter(lambda w: w is not None)),
                    clock_event_reasons=draw(st.sampled_from([None, 0, 4])),
                    health=draw(st.sampled_from([GpuHealth.OK] * 6 + [GpuHealth.DEGRADED, GpuHealth.LOST])),
                )
                for g in infos
            )
        )
    return Case(draw(st.integers(0, len(CONFIGS) - 1)), tuple(infos), tuple(ticks))


def test_only_limits_inside_a_real_range_are_ever_written(tmp_path: Path) -> None:
    """Under any shipped config, whatever the card says about its range and whatever it reads, no tick
    raises and every write lies inside a range the card reported (cards without one are never written)."""
    wrote = Branch("a limit written")

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(cases())
    def check(case: Case) -> None:
        doc = dict(CONFIGS[case.config], state_dir=str(tmp_path / "state"), runtime_dir="", dry_run=False)
        for stale in (tmp_path / "state").glob("*"):
            stale.unlink()
        config = parse_config(doc, "shipped")
        backend = HostileBackend(case.infos, list(case.ticks))
        governor = Governor(config, backend, open_originals(config))
        for _ in case.ticks:
            report = governor.step(governor.read())
            for result in report.results:
                if result.outcome is Outcome.REFUSED and result.decision.gpu_uuid in governor.actuator.monitor_only:
                    assert result.detail is not None
        by_uuid = {g.uuid: g for g in case.infos}
        for uuid, watts in backend.sets:
            info = by_uuid[uuid]
            assert info.power_limit_min_w is not None and info.power_limit_max_w is not None, (uuid, watts)
            assert info.power_limit_min_w <= watts <= info.power_limit_max_w, (info, watts)
        for info in case.infos:
            if info.power_limit_min_w is None:
                assert governor.actuator.monitor_only.get(info.uuid) == NO_RANGE
        wrote.saw(bool(backend.sets))

    check()
    wrote.require(MIN_SHARE)


def test_water_fill_with_nothing_to_share() -> None:
    """The budget's fill returns the floors when no GPU can move or the budget is not a number (never raises)."""
    assert water_fill(100.0, [], [], [], []) == []
    assert water_fill(math.nan, [50.0], [80.0], [100.0], [1.0]) == [50.0]


def test_a_gpu_that_reports_a_range_later_is_governed_again(tmp_path: Path) -> None:
    """A GPU first seen without a range is monitor-only; once it reports one (a driver reload), it is not."""
    config = Config(state_dir=str(tmp_path / "state"), runtime_dir="")
    bare = GpuInfo(0, "GPU-0", "x")
    backend = HostileBackend((bare,), [])
    governor = Governor(config, backend, open_originals(config))
    assert governor.actuator.monitor_only == {"GPU-0": NO_RANGE}
    governor.actuator.set_gpus([GpuInfo(0, "GPU-0", "x", power_limit_min_w=100.0, power_limit_max_w=220.0)])
    assert governor.actuator.monitor_only == {}


def test_a_card_that_lost_its_range_still_gets_its_original_back(tmp_path: Path) -> None:
    """A saved original (a crash left 180 W in force) is restored even when the card now reports no range:
    the value is the card's own, and forgetting it would leave the governor's cut in force for good."""
    config = Config(state_dir=str(tmp_path / "state"), runtime_dir="")
    originals = open_originals(config)
    originals.remember("GPU-0", 200.0, last_set_w=180.0)
    reading = GpuReading(index=0, uuid="GPU-0", temperature_c=50.0, power_limit_w=180.0)
    backend = HostileBackend((GpuInfo(0, "GPU-0", "x"),), [(reading,)])
    governor = Governor(config, backend, open_originals(config))
    report = governor.restore(governor.read(), 1.0, "restore_after_crash", 1.7e9)
    assert backend.sets == [("GPU-0", 200.0)]
    assert [r.outcome for r in report.results if r.decision.gpu_uuid == "GPU-0"] == [Outcome.APPLIED]
    assert governor.originals.get("GPU-0") is None
