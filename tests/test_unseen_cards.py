"""The governor over NVML on cards the project has never run on: other power ranges, broken sensors,
repeated UUIDs, odd default limits.

Every test drives the real NVML adapter (over tests/fake_pynvml.py) and, where it says so, the real
governor built from a shipped config, as the daemon builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor.backends.nvml import NvmlBackend
from governor.clock import VirtualClock
from governor.config import DEEP_CAP_RATIO, parse_config, parse_toml
from governor.core import Governor, open_originals
from governor.model import GpuHealth, GpuReading, Outcome, Snapshot
from governor.policy import Rule, ThermalZone, VramPolicy
from governor.rules.engine import GpuPlan, GpuRuleState, evaluate_gpu
from governor.rules.vram import under_pressure
from tests.builders import step_ticks
from tests.fake_pynvml import NVML_ERROR_NOT_SUPPORTED, FakeGpu, FakeNvml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "governor.toml"
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"


@dataclass(frozen=True)
class Card:
    """A card as NVML describes it, in NVML's milliwatts."""

    name: str
    min_mw: int
    max_mw: int
    default_mw: int


CARDS = (
    Card("NVIDIA GeForce RTX 4060 Laptop GPU", 35_000, 80_000, 80_000),
    Card("NVIDIA GeForce RTX 3060", 100_000, 170_000, 170_000),
    Card("NVIDIA GeForce RTX 4090", 150_000, 600_000, 450_000),
    Card("NVIDIA L4", 40_000, 72_000, 72_000),
    Card("NVIDIA B200", 200_000, 1_000_000, 1_000_000),
    Card("NVIDIA Tesla T4 (fixed limit)", 70_000, 70_000, 70_000),
)


def fake_card(card: Card, uuid: str = UUID0, **fields: Any) -> FakeGpu:
    """A FakeGpu with ``card``'s range, enforcing its default unless ``fields`` says otherwise."""
    values: dict[str, Any] = {
        "uuid": uuid,
        "name": card.name,
        "limit_min_mw": card.min_mw,
        "limit_max_mw": card.max_mw,
        "limit_default_mw": card.default_mw,
        "enforced_limit_mw": card.default_mw,
        "requested_limit_mw": card.default_mw,
        "temperature_c": 40,
    }
    values.update(fields)
    return FakeGpu(**values)


def governed(
    tmp_path: Path, *gpus: FakeGpu, config: Path = SHIPPED, **overrides: Any
) -> tuple[Governor, FakeNvml, VirtualClock]:
    """The governor of ``config`` (state under ``tmp_path``, not dry-run) over the NVML adapter over ``gpus``."""
    clock = VirtualClock()
    fake = FakeNvml(gpus)
    backend = NvmlBackend(clock, nvml=fake)
    doc = dict(parse_toml(config.read_bytes(), str(config)), state_dir=str(tmp_path / "state"), runtime_dir="")
    doc.update(dry_run=False, **overrides)
    parsed = parse_config(doc, str(config))
    return Governor(parsed, backend, open_originals(parsed)), fake, clock


# ----------------------------------------------------------------------------- temperature sensors


class TestImplausibleFanRange:
    @pytest.mark.parametrize("fan_range", [(100, 30), (30, 255), (-1, 100)])
    def test_a_fan_range_no_card_has_is_unknown(self, fan_range: tuple[int, int]) -> None:
        """An inverted speed range, or one outside 0-100 %, is dropped (None, logged once): the fan rule
        then clamps to 0-100 % instead of to a range no card has."""
        fake = FakeNvml([FakeGpu(uuid=UUID0, fans=[40, 40], fan_range=fan_range)])
        with capture_logs() as logs:
            backend = NvmlBackend(VirtualClock(), nvml=fake)
            backend.read()
            (info,) = backend.gpus()
        assert (info.fan_count, info.fan_speed_min_percent, info.fan_speed_max_percent) == (2, None, None)
        assert [e["event"] for e in logs].count("nvml_value_implausible") == 1

    def test_a_plausible_fan_range_is_kept(self) -> None:
        """A range such as 30-100 % is the card's, kept as read."""
        backend = NvmlBackend(VirtualClock(), nvml=FakeNvml([FakeGpu(uuid=UUID0, fans=[40], fan_range=(30, 100))]))
        (info,) = backend.gpus()
        assert (info.fan_speed_min_percent, info.fan_speed_max_percent) == (30.0, 100.0)


class TestBrokenTemperatureSensor:
    @pytest.mark.parametrize("raw_c", [0, 255, 65535, 4294967295])
    def test_a_sensor_error_value_reads_as_missing(self, raw_c: int) -> None:
        """0 C, 255 C (an 8-bit -1), 65535 C and 4294967295 C (a 32-bit -1) read as None and the GPU as degraded."""
        fake = FakeNvml([FakeGpu(uuid=UUID0, temperature_c=raw_c)])
        backend = NvmlBackend(VirtualClock(), nvml=fake)
        with capture_logs() as logs:
            (reading,) = backend.read().gpus
            backend.read()
        assert reading.temperature_c is None
        assert reading.health is GpuHealth.DEGRADED
        assert reading.error is not None and str(raw_c) in reading.error
        assert [e["event"] for e in logs].count("nvml_value_implausible") == 1  # once, not every tick

    def test_a_one_tick_sensor_glitch_changes_no_limit(self, tmp_path: Path) -> None:
        """A GPU at 40 C that reads 65535 C for one tick keeps its limit: the glitch is no critical zone."""
        card = fake_card(CARDS[2])
        governor, _, clock = governed(tmp_path, card)
        step_ticks(governor, clock, 3)
        card.temperature_c = 65535
        results = step_ticks(governor, clock, 1)
        card.temperature_c = 40
        results += step_ticks(governor, clock, 3)
        assert card.enforced_limit_mw == CARDS[2].default_mw
        assert not [r for r in results if r.outcome is Outcome.APPLIED]
        assert governor.states[UUID0].zone is ThermalZone.OPTIMAL

    @pytest.mark.parametrize("temperature_c", [0.0, -5.0, 255.0, 65535.0])
    def test_the_rules_treat_an_impossible_temperature_as_missing(self, temperature_c: float) -> None:
        """Whatever the backend, the rules read an impossible temperature as no reading: zone unknown, no set."""
        card = CARDS[2]
        backend = NvmlBackend(VirtualClock(), nvml=FakeNvml([fake_card(card)]))
        (info,) = backend.gpus()
        config = parse_config(parse_toml(SHIPPED.read_bytes(), str(SHIPPED)), str(SHIPPED))
        plan = GpuPlan.build(info, config.policy_for(info))
        reading = GpuReading(index=0, uuid=UUID0, temperature_c=temperature_c, power_limit_w=450.0)
        state, decisions = evaluate_gpu(reading, plan, GpuRuleState(zone=ThermalZone.OPTIMAL), 1.0)
        assert state.zone is ThermalZone.UNKNOWN
        assert all(d.to_w is None or d.to_w == d.from_w for d in decisions), decisions


# ----------------------------------------------------------------------------- memory and power readings


class TestImpossibleReadings:
    def test_memory_used_above_total_reads_as_missing(self) -> None:
        """VRAM used above the card's total is no reading (None), and a process said to use more than the card
        has reads as unknown use: neither can put the GPU under pressure or a process over its budget."""
        card = FakeGpu(uuid=UUID0, memory_total=10**10, memory_used=10**12, compute=[(4321, 5 * 10**12)])
        backend = NvmlBackend(VirtualClock(), nvml=FakeNvml([card]))
        (reading,) = backend.read().gpus
        assert reading.memory_used_bytes is None
        assert reading.processes is not None and [p.used_memory_bytes for p in reading.processes] == [None]
        assert not under_pressure(reading, VramPolicy(enabled=True))

    def test_the_pressure_check_ignores_used_above_total(self) -> None:
        """From any backend, a reading with more VRAM used than the card has is no memory pressure."""
        reading = GpuReading(index=0, uuid=UUID0, memory_used_bytes=2 * 10**10, memory_total_bytes=10**10)
        assert not under_pressure(reading, VramPolicy(enabled=True))

    def test_a_draw_far_above_the_cards_maximum_reads_as_missing(self) -> None:
        """A 7000 W draw on a 700 W card is a broken answer (None); a draw a little over the limit is kept."""
        card = FakeGpu(uuid=UUID0, power_mw=7_000_000)
        backend = NvmlBackend(VirtualClock(), nvml=FakeNvml([card]))
        assert backend.read().gpus[0].power_w is None
        card.power_mw = 760_000  # a real excursion over 700 W
        assert backend.read().gpus[0].power_w == 760.0

    def test_utilisation_over_100_percent_reads_as_missing(self) -> None:
        """An utilisation of 250 % is no ratio (None), not 2.5."""
        backend = NvmlBackend(VirtualClock(), nvml=FakeNvml([FakeGpu(uuid=UUID0, utilization_pct=250)]))
        assert backend.read().gpus[0].utilization_gpu_ratio is None


# ----------------------------------------------------------------------------- identity


class TestRepeatedUuid:
    def test_a_repeated_uuid_is_opened_once(self) -> None:
        """Two cards answering the same UUID: the first is governed, the repeat is skipped with a warning,
        so a limit meant for one is never written to the other."""
        first, repeat = FakeGpu(uuid=UUID0, temperature_c=40), FakeGpu(uuid=UUID0, temperature_c=90)
        with capture_logs() as logs:
            backend = NvmlBackend(VirtualClock(), nvml=FakeNvml([first, repeat]))
        assert [(g.index, g.uuid) for g in backend.gpus()] == [(0, UUID0)]
        assert [r.index for r in backend.read().gpus] == [0]
        assert any(e["event"] == "nvml_gpu_skipped" and e["gpu"] == 1 for e in logs)
        backend.set_power_limit(UUID0, 650.0)
        assert (first.enforced_limit_mw, repeat.enforced_limit_mw) == (650_000, 700_000)


# ----------------------------------------------------------------------------- limits


class TestLimitsOnOtherCards:
    @pytest.mark.parametrize("card", CARDS, ids=lambda c: c.name)
    @pytest.mark.parametrize("config", ["governor.toml", "examples/rtx4070.toml", "examples/rtx4070-target.toml"])
    def test_every_write_lies_in_the_range_and_under_the_original(
        self, tmp_path: Path, card: Card, config: str
    ) -> None:
        """Hot, critical and cool again, on each card and shipped config: every limit written lies in the card's
        range and never above the limit the card had before the governor came, and the stop gives that limit
        back; the RTX 4070 example ladder is refused at start on a card it would cap deeply."""
        start_mw = max(card.min_mw, card.default_mw - 5_000)  # an admin set it a little under the default
        gpu = fake_card(card, enforced_limit_mw=start_mw, requested_limit_mw=start_mw)
        writes: list[int] = []
        governor, fake, clock = governed(tmp_path, gpu, config=ROOT / "config" / config)
        issues = governor.contradictions()
        if issues:  # a 200 W card's example ladder on a card it would cap deeply: refused at start, nothing written
            assert config == "examples/rtx4070.toml" and card.default_mw > 200_000 / DEEP_CAP_RATIO, issues
            assert all("allow_deep_cap" in str(issue) for issue in issues), issues
            return
        setter = fake.nvmlDeviceSetPowerManagementLimit

        def recorded(handle: Any, limit_mw: int) -> None:
            writes.append(limit_mw)
            setter(handle, limit_mw)

        fake.nvmlDeviceSetPowerManagementLimit = recorded  # type: ignore[method-assign]
        for temperature_c, seconds in ((80, 120), (97, 5), (50, 900), (85, 200), (40, 2000)):
            gpu.temperature_c = temperature_c
            step_ticks(governor, clock, seconds)
        governor.restore(governor.read(), clock.monotonic(), "restore_on_stop", 0.0)
        assert all(card.min_mw <= w <= card.max_mw for w in writes), writes
        assert all(w <= start_mw for w in writes), (start_mw, writes)
        assert gpu.enforced_limit_mw == start_mw

    def test_a_step_back_up_stops_at_the_original_limit(self, tmp_path: Path) -> None:
        """A 3060 an admin left at 165 W (default 170 W): hot steps it down to 153 W, cool brings it back to
        165 W, not to the ladder's 170 W top."""
        gpu = fake_card(CARDS[1], enforced_limit_mw=165_000, requested_limit_mw=165_000)
        governor, _, clock = governed(tmp_path, gpu)
        gpu.temperature_c = 80
        step_ticks(governor, clock, 10)
        assert gpu.enforced_limit_mw == 153_000
        gpu.temperature_c = 50
        step_ticks(governor, clock, 300)
        assert gpu.enforced_limit_mw == 165_000

    def test_the_cap_at_the_original_is_no_out_of_band_limit(self, tmp_path: Path) -> None:
        """After a step back up capped at the card's own 165 W (the ladder's top is 170 W) the drift check
        reports no limit "set outside the governor"; a real out-of-band 120 W limit is still reported,
        once, and left alone."""
        gpu = fake_card(CARDS[1], enforced_limit_mw=165_000, requested_limit_mw=165_000)
        governor, _, clock = governed(tmp_path, gpu)
        gpu.temperature_c = 80
        results = step_ticks(governor, clock, 10)
        gpu.temperature_c = 50
        results += step_ticks(governor, clock, 300)
        assert gpu.enforced_limit_mw == 165_000  # capped, as the test above proves
        external = Rule.POWER_DRIFT_EXTERNAL_LOWER
        assert [r.decision.reason for r in results if r.decision.rule is external] == []
        gpu.enforced_limit_mw = gpu.requested_limit_mw = 120_000  # another tool lowers it
        results = step_ticks(governor, clock, 60)
        reports = [r for r in results if r.decision.rule is external]
        assert [(r.decision.from_w, r.decision.to_w) for r in reports] == [(120.0, 165.0)]
        assert gpu.enforced_limit_mw == 120_000  # never fought

    def test_an_absolute_ladder_cannot_deep_cap_a_card_without_a_default(self, tmp_path: Path) -> None:
        """A 4090 whose default limit NVML will not give is measured by its maximum: the 4070 example's 200 W
        ladder is refused for it, and its 450 W limit is never cut to 200 W."""
        gpu = fake_card(CARDS[2], temperature_c=85, errors={"nvmlDeviceGetPowerManagementDefaultLimit": 3})
        governor, _, clock = governed(tmp_path, gpu, config=ROOT / "config" / "examples" / "rtx4070.toml")
        assert governor.contradictions(), "a 200 W ladder on a 600 W card must be refused at start"
        step_ticks(governor, clock, 60)
        assert gpu.enforced_limit_mw == 450_000

    def test_an_enforced_limit_above_the_range_is_saved_clamped(self, tmp_path: Path) -> None:
        """A card enforcing 720 W over its 700 W maximum: the original is saved as 700 W (what NVML lets the
        stop write back), and the state file is not set aside as corrupt by the governor's own entry."""
        gpu = FakeGpu(uuid=UUID0, temperature_c=85, enforced_limit_mw=720_000, requested_limit_mw=720_000)
        governor, _, clock = governed(tmp_path, gpu)
        warnings: list[str] = []
        for _ in range(120):
            clock.advance(1.0)
            report = governor.step(governor.read())
            warnings += report.state_warnings
        assert gpu.enforced_limit_mw == 630_000
        assert warnings == []
        restarted, _, _ = governed(tmp_path, gpu)  # the next start reads the file the governor wrote
        restarted.restore(restarted.read(), 1.0, "restore_after_crash", 0.0)
        assert gpu.enforced_limit_mw == 700_000
        assert not list((tmp_path / "state").glob("*.corrupt"))


# ----------------------------------------------------------------------------- one sick GPU among many


def test_one_card_refusing_every_read_leaves_seven_governed(tmp_path: Path) -> None:
    """Eight hot cards, one answering NotSupported to every call after start: the seven others step down,
    the sick one reads as missing (None, never 0) and is never written."""
    gpus = [fake_card(CARDS[4], uuid=f"GPU-{i}", temperature_c=85) for i in range(8)]
    governor, fake, clock = governed(tmp_path, *gpus)
    symbols = [n for n in dir(fake) if n.startswith("nvmlDevice") and n != "nvmlDeviceGetHandleByIndex"]
    gpus[3].errors = {f"{s}{v}": NVML_ERROR_NOT_SUPPORTED for s in symbols for v in ("", "_v2", "_v3")}
    step_ticks(governor, clock, 60)
    snapshot: Snapshot = governor.read()
    sick = snapshot.gpus[3]
    assert sick.temperature_c is None and sick.power_w is None and sick.memory_used_bytes is None
    assert sick.health is GpuHealth.DEGRADED
    assert [g.enforced_limit_mw for g in gpus] == [900_000] * 3 + [1_000_000] + [900_000] * 4
