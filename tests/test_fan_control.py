"""Fan control through NVML against the fake pynvml: the write path, the refusals, dry run and durability."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from governor.backends import GpuLostError, SetLimitRefused
from governor.backends.nvml import NvmlBackend
from governor.clock import VirtualClock
from governor.config import Config, FanMode, FanPolicy, PowerPolicy
from governor.core import Governor, TickReport
from governor.fanstate import FAN_STATE_FILE_NAME
from governor.messages import message
from governor.model import Action, Outcome
from governor.observers import DecisionLog
from governor.policy import Rule
from governor.state import OriginalLimits
from tests.fake_pynvml import (
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    FakeGpu,
    FakeNvml,
)

UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
ASSIST = FanPolicy(mode=FanMode.ASSIST, max_percent=75.0)
POWER = PowerPolicy(ladder_w=("100%", "90%"), min_change_interval_s=0.0)


def consumer_card(**fields: Any) -> FakeGpu:
    """A hot two-fan consumer card (200 W default) whose fans the card runs at 45 %."""
    values: dict[str, Any] = {
        "uuid": UUID0,
        "name": "NVIDIA GeForce RTX 4070",
        "temperature_c": 78,
        "enforced_limit_mw": 200_000,
        "requested_limit_mw": 200_000,
        "limit_min_mw": 100_000,
        "limit_max_mw": 220_000,
        "limit_default_mw": 200_000,
        "fans": [45, 45],
    }
    values.update(fields)
    return FakeGpu(**values)


def backend_for(gpu: FakeGpu, **fake: Any) -> tuple[NvmlBackend, FakeNvml, VirtualClock]:
    clock = VirtualClock()
    nvml = FakeNvml([gpu], **fake)
    return NvmlBackend(clock, nvml=nvml, telemetry_refresh_s=1.0), nvml, clock


def governor_for(
    tmp_path: Path, gpu: FakeGpu, *, fan: FanPolicy = ASSIST, dry_run: bool = False, **fake: Any
) -> tuple[Governor, FakeNvml, VirtualClock]:
    backend, nvml, clock = backend_for(gpu, **fake)
    config = Config(state_dir=str(tmp_path / "state"), runtime_dir="", dry_run=dry_run, power=POWER, fan=fan)
    return Governor(config, backend, OriginalLimits(tmp_path / "state")), nvml, clock


def tick(governor: Governor, clock: VirtualClock, t: float) -> TickReport:
    clock.advance_to(t)
    return governor.step(governor.read(), clock.wall())


def fan_results(reports: list[TickReport]) -> list[tuple[float, Action, int | None, Outcome, str | None]]:
    return [
        (r.decision.t_s, r.decision.action, r.decision.fan, r.outcome, r.detail)
        for report in reports
        for r in report.results
        if r.decision.fan is not None
    ]


class TestBackend:
    def test_fan_facts_are_read_once_at_open(self) -> None:
        """Fan count and the settable range come into GpuInfo; a data-center board has none (None, not 0)."""
        backend, _, _ = backend_for(consumer_card())
        (info,) = backend.gpus()
        assert (info.fan_count, info.fan_speed_min_percent, info.fan_speed_max_percent) == (2, 30.0, 100.0)
        dc, _, _ = backend_for(FakeGpu(uuid=UUID0, fans=None))
        (dc_info,) = dc.gpus()
        assert (dc_info.fan_count, dc_info.fan_speed_min_percent) == (None, None)
        no_range, _, _ = backend_for(consumer_card(fan_range=None))
        assert no_range.gpus()[0].fan_speed_min_percent is None and no_range.gpus()[0].fan_count == 2

    def test_set_switches_to_manual_and_hand_back_restores_the_card_control(self) -> None:
        """set_fan_speed writes the percent (manual policy); set_fan_auto calls SetDefaultFanSpeed_v2."""
        backend, nvml, clock = backend_for(consumer_card())
        backend.set_fan_speed(UUID0, 1, 70)
        gpu = nvml.gpus[0]
        assert gpu.fan_writes == [("speed", 1, 70)] and gpu.fan_policies == {1: 1} and gpu.fans == [45, 70]
        clock.advance(2.0)
        telemetry = backend.read().gpus[0].telemetry
        assert telemetry is not None and telemetry.fan_speed_ratios == ((0, 0.45), (1, 0.70))
        backend.set_fan_auto(UUID0, 1)
        assert gpu.fan_writes[-1] == ("default", 1, None) and gpu.fan_policies == {} and gpu.fans == [45, 45]

    def test_old_driver_hands_back_through_the_fan_policy(self) -> None:
        """Without nvmlDeviceSetDefaultFanSpeed_v2 the fan goes back through SetFanControlPolicy(continuous)."""
        backend, nvml, _ = backend_for(consumer_card(), absent_symbols={"nvmlDeviceSetDefaultFanSpeed_v2"})
        backend.set_fan_speed(UUID0, 0, 60)
        backend.set_fan_auto(UUID0, 0)
        assert nvml.gpus[0].fan_writes == [("speed", 0, 60), ("policy", 0, 0)] and nvml.gpus[0].fans == [45, 45]

    @pytest.mark.parametrize(
        ("fake", "why"),
        [
            ({"errors": {"nvmlDeviceSetFanSpeed_v2": NVML_ERROR_NO_PERMISSION}}, "Insufficient Permissions"),
            ({"errors": {"nvmlDeviceSetFanSpeed_v2": NVML_ERROR_NOT_SUPPORTED}}, "Not Supported"),
            ({"absent": {"nvmlDeviceSetFanSpeed_v2"}}, "Function Not Found"),
            ({"missing": {"nvmlDeviceSetFanSpeed_v2"}}, "needs R520+"),
        ],
    )
    def test_refusals_are_set_limit_refused(self, fake: dict[str, Any], why: str) -> None:
        """No permission, NotSupported, a driver or bindings without the call: SetLimitRefused naming why."""
        gpu = consumer_card(errors=fake.get("errors", {}))
        backend, _, _ = backend_for(gpu, absent_symbols=fake.get("absent", ()), missing=fake.get("missing", ()))
        with pytest.raises(SetLimitRefused, match=why):
            backend.set_fan_speed(UUID0, 0, 70)

    def test_a_lost_gpu_is_gpu_lost(self) -> None:
        """Setting a fan of a GPU that stopped answering raises GpuLostError."""
        backend, nvml, clock = backend_for(consumer_card())
        nvml.gpus[0].lost = True
        clock.advance(1.0)
        backend.read()
        with pytest.raises(GpuLostError):
            backend.set_fan_speed(UUID0, 0, 70)


class TestAssistThroughNvml:
    def test_fans_rise_to_the_ceiling_before_the_power_limit_moves(self, tmp_path: Path) -> None:
        """A card held at 78 C: fans 55, 65, 75 %; the limit stays 200 W until the ceiling held for settle_s."""
        governor, nvml, clock = governor_for(tmp_path, consumer_card())
        gpu = nvml.gpus[0]
        for t in range(0, 80):
            tick(governor, clock, float(t))
            if t == 65:
                assert gpu.enforced_limit_mw == 200_000
        speeds = [p for call, fan, p in gpu.fan_writes if call == "speed" and fan == 0]
        assert speeds == [55, 65, 75]
        assert gpu.enforced_limit_mw == 180_000  # after 60 s at the ceiling, still hot: the ladder steps
        saved = json.loads((tmp_path / "state" / FAN_STATE_FILE_NAME).read_text())
        assert saved == {"manual_fans": {UUID0: 2}, "version": 1}

    def test_dry_run_says_would_set_and_writes_nothing(self, tmp_path: Path) -> None:
        """Dry run: "would set fan 0 to 55 %" in the log, no fan write, no state file."""
        governor, nvml, clock = governor_for(tmp_path, consumer_card(), dry_run=True)
        report = tick(governor, clock, 0.0)
        assert [(a, f, o) for _, a, f, o, _ in fan_results([report])] == [
            (Action.SET_FAN_SPEED, 0, Outcome.DRY_RUN),
            (Action.SET_FAN_SPEED, 1, Outcome.DRY_RUN),
        ]
        with capture_logs() as logs:
            DecisionLog(structlog.get_logger()).observe(report)
        (event, _) = [e for e in logs if e["event"] == "fan_would_set"]
        assert event["detail"] == "would set fan 0 to 55 %"
        assert (message("fan_would_set", event) or "").startswith("GPU 0 would set fan 0 to 55 % (dry run)")
        assert nvml.gpus[0].fan_writes == [] and not (tmp_path / "state" / FAN_STATE_FILE_NAME).exists()

    def test_refused_fans_turn_monitor_only_once_and_the_ladder_takes_over(self, tmp_path: Path) -> None:
        """NO_PERMISSION on the first set: one failed result, the fans monitor-only (one warning), never
        retried, and the power ladder steps down as without fan assist."""
        gpu = consumer_card(errors={"nvmlDeviceSetFanSpeed_v2": NVML_ERROR_NO_PERMISSION})
        governor, nvml, clock = governor_for(tmp_path, gpu)
        log = DecisionLog(structlog.get_logger())
        with capture_logs() as logs:
            reports = []
            for t in range(10):
                reports.append(tick(governor, clock, float(t)))
                log.observe(reports[-1])
        failed = [r for r in fan_results(reports) if r[3] is Outcome.FAILED]
        assert len(failed) == 1 and "Insufficient Permissions" in (failed[0][4] or "")
        assert nvml.calls["nvmlDeviceSetFanSpeed_v2"] == 1
        assert nvml.gpus[0].enforced_limit_mw == 180_000
        monitor = [e for e in logs if e["event"] == "gpu_fans_monitor_only"]
        assert len(monitor) == 1 and monitor[0]["log_level"] == "warning"
        assert reports[-1].gpus[0].fan.monitor_only is not None and reports[-1].gpus[0].fan.targets_percent == ()

    def test_a_fan_that_does_not_follow_is_handed_back_once(self, tmp_path: Path) -> None:
        """The card accepts 55 % but its fans keep reading 45 %: after follow_timeout_s both go back to the
        card's control (one warning), nothing is set again, and the ladder steps down."""
        governor, nvml, clock = governor_for(tmp_path, consumer_card(fans_follow=False), fan=replace_fan(step=1000.0))
        log = DecisionLog(structlog.get_logger())
        with capture_logs() as logs:
            for t in range(0, 60):
                log.observe(tick(governor, clock, float(t)))
        gpu = nvml.gpus[0]
        assert [c for c, _, _ in gpu.fan_writes] == ["speed", "speed", "default", "default"]
        events = [e for e in logs if e["event"] == "fan_not_following"]
        assert len(events) == 2 and all(e["log_level"] == "warning" for e in events)
        assert gpu.enforced_limit_mw == 180_000 and gpu.fan_policies == {}
        assert not (tmp_path / "state" / FAN_STATE_FILE_NAME).read_text().count(UUID0)

    def test_data_center_gpu_is_monitor_only_once_never_an_error(self, tmp_path: Path) -> None:
        """An H100-like board (fan count NotSupported) in assist mode and dry run: one info event saying
        so, no fan decision, no error or warning about fans."""
        governor, nvml, clock = governor_for(tmp_path, FakeGpu(uuid=UUID0, fans=None, temperature_c=80), dry_run=True)
        log = DecisionLog(structlog.get_logger())
        with capture_logs() as logs:
            reports = [tick(governor, clock, float(t)) for t in range(5)]
            for report in reports:
                log.observe(report)
        fan_events = [e for e in logs if "fan" in e["event"]]
        assert [(e["event"], e["log_level"]) for e in fan_events] == [("gpu_fans_monitor_only", "info")]
        assert "not supported" in fan_events[0]["reason"]
        assert fan_results(reports) == [] and nvml.calls["nvmlDeviceSetFanSpeed_v2"] == 0


def replace_fan(step: float) -> FanPolicy:
    """ASSIST with ``step_interval_s`` = ``step`` (no raise after the first) and a 5 % follow tolerance."""
    return FanPolicy(mode=FanMode.ASSIST, max_percent=75.0, step_interval_s=step, follow_tolerance_percent=5.0)


def saved_takeover(tmp_path: Path, fans: int) -> Path:
    """The fan-control.json an earlier run left: ``fans`` fans of UUID0 taken over; its path."""
    path = tmp_path / "state" / FAN_STATE_FILE_NAME
    path.parent.mkdir()
    path.write_text(json.dumps({"version": 1, "manual_fans": {UUID0: fans}}))
    return path


def restored_at_start(tmp_path: Path, gpu: FakeGpu, *, dry_run: bool = False) -> tuple[TickReport, FakeNvml]:
    """A governor started on ``gpu`` (fans left to the card) and its restore_after_crash report."""
    governor, nvml, _ = governor_for(tmp_path, gpu, fan=FanPolicy(), dry_run=dry_run)
    return governor.restore(governor.read(), 0.0, "restore_after_crash", 0.0), nvml


def hand_backs(report: TickReport) -> list[tuple[int | None, Outcome]]:
    """(fan, outcome) of every result of a restore report."""
    return [(r.decision.fan, r.outcome) for r in report.results]


class TestDurability:
    def test_no_fan_is_set_before_the_takeover_is_on_disk(self, tmp_path: Path) -> None:
        """A state directory that cannot be written: the set is refused and nothing is written to the card;
        once it can be, the set goes through."""
        blocker = tmp_path / "state"
        blocker.write_text("a file where the directory should be")
        backend, nvml, clock = backend_for(consumer_card())
        config = Config(state_dir=str(blocker), runtime_dir="", power=POWER, fan=ASSIST)
        governor = Governor(config, backend, OriginalLimits(blocker))
        refused = fan_results([tick(governor, clock, 0.0)])
        assert {o for *_, o, _ in refused} == {Outcome.REFUSED} and nvml.gpus[0].fan_writes == []
        blocker.unlink()
        applied = fan_results([tick(governor, clock, 1.0)])
        assert {o for *_, o, _ in applied} == {Outcome.APPLIED}
        assert [c for c, _, _ in nvml.gpus[0].fan_writes] == ["speed", "speed"]

    def test_stop_hands_every_fan_back(self, tmp_path: Path) -> None:
        """restore_on_stop calls SetDefaultFanSpeed_v2 for both fans and empties the state file."""
        governor, nvml, clock = governor_for(tmp_path, consumer_card())
        tick(governor, clock, 0.0)
        report = governor.restore(governor.read(), 1.0, "restore_on_stop", 1.0)
        fans = [(r.decision.rule, r.decision.fan, r.outcome) for r in report.results if r.decision.fan is not None]
        assert fans == [(Rule.RESTORE_ON_STOP, 0, Outcome.APPLIED), (Rule.RESTORE_ON_STOP, 1, Outcome.APPLIED)]
        assert nvml.gpus[0].fan_policies == {}
        assert json.loads((tmp_path / "state" / FAN_STATE_FILE_NAME).read_text())["manual_fans"] == {}

    def test_crash_leftovers_are_handed_back_at_start(self, tmp_path: Path) -> None:
        """A takeover saved by a run that died: the next start hands both fans back before the first tick."""
        state = tmp_path / "state"
        state.mkdir()
        (state / FAN_STATE_FILE_NAME).write_text(json.dumps({"version": 1, "manual_fans": {UUID0: 2}}))
        gpu = consumer_card(temperature_c=40, fan_policies={0: 1, 1: 1}, fans=[80, 80], auto_fans=[45, 45])
        governor, nvml, _ = governor_for(tmp_path, gpu, fan=FanPolicy())
        report = governor.restore(governor.read(), 0.0, "restore_after_crash", 0.0)
        assert [r.outcome for r in report.results] == [Outcome.APPLIED, Outcome.APPLIED]
        assert nvml.gpus[0].fan_policies == {} and nvml.gpus[0].fans == [45, 45]
        assert json.loads((state / FAN_STATE_FILE_NAME).read_text())["manual_fans"] == {}

    def test_fans_the_card_does_not_have_are_dropped_once(self, tmp_path: Path) -> None:
        """A saved takeover of 4 fans on a 2-fan card: both fans go back, fans 2-3 are never tried, one
        warning names them, and the entry is gone, so the next start tries and says nothing."""
        path = saved_takeover(tmp_path, fans=4)
        gpu = consumer_card(temperature_c=40, fan_policies={0: 1, 1: 1}, fans=[80, 80], auto_fans=[45, 45])
        report, nvml = restored_at_start(tmp_path, gpu)
        assert hand_backs(report) == [(0, Outcome.APPLIED), (1, Outcome.APPLIED)]
        assert nvml.gpus[0].fan_writes == [("default", 0, None), ("default", 1, None)]
        with capture_logs() as logs:
            DecisionLog(structlog.get_logger()).observe(report)
        (event,) = [e for e in logs if e["event"] == "state_entry_rejected"]
        assert event["log_level"] == "warning"
        assert all(part in event["detail"] for part in (FAN_STATE_FILE_NAME, UUID0, "fans 2-3", "has 2"))
        assert json.loads(path.read_text())["manual_fans"] == {}
        second, nvml = restored_at_start(tmp_path, consumer_card(temperature_c=40))
        assert (second.results, second.state_warnings, nvml.gpus[0].fan_writes) == ((), (), [])

    def test_a_failed_hand_back_keeps_only_the_fans_the_card_has(self, tmp_path: Path) -> None:
        """The same 4-fan entry while the card's hand-back times out: the entry is cut to the 2 real fans,
        and the next start hands back exactly those."""
        path = saved_takeover(tmp_path, fans=4)
        failing = consumer_card(temperature_c=40, errors={"nvmlDeviceSetDefaultFanSpeed_v2": NVML_ERROR_TIMEOUT})
        report, _ = restored_at_start(tmp_path, failing)
        assert hand_backs(report) == [(0, Outcome.FAILED), (1, Outcome.FAILED)]
        assert json.loads(path.read_text())["manual_fans"] == {UUID0: 2}
        second, nvml = restored_at_start(tmp_path, consumer_card(temperature_c=40))
        assert hand_backs(second) == [(0, Outcome.APPLIED), (1, Outcome.APPLIED)] and second.state_warnings == ()
        assert nvml.gpus[0].fan_writes == [("default", 0, None), ("default", 1, None)]

    def test_dry_run_hands_back_only_real_fans_and_keeps_the_entry(self, tmp_path: Path) -> None:
        """Dry run: "would hand back" for the 2 real fans only; the file is left as it was."""
        path = saved_takeover(tmp_path, fans=4)
        text = path.read_text()
        report, nvml = restored_at_start(tmp_path, consumer_card(temperature_c=40), dry_run=True)
        assert hand_backs(report) == [(0, Outcome.DRY_RUN), (1, Outcome.DRY_RUN)]
        assert path.read_text() == text and nvml.gpus[0].fan_writes == []

    @pytest.mark.parametrize("text", ["{", '{"version": 1, "manual_fans": {"GPU-x": "two"}}', "[]"])
    def test_a_corrupt_file_hands_back_every_fan(self, tmp_path: Path, text: str) -> None:
        """An unreadable takeover file is set aside and every fan of every GPU goes back to the card at start."""
        state = tmp_path / "state"
        state.mkdir()
        (state / FAN_STATE_FILE_NAME).write_text(text)
        gpu = consumer_card(temperature_c=40, fan_policies={0: 1}, fans=[80, 45], auto_fans=[45, 45])
        governor, nvml, _ = governor_for(tmp_path, gpu, fan=FanPolicy())
        assert governor.actuator.fans.store.load_warning is not None
        report = governor.restore(governor.read(), 0.0, "restore_after_crash", 0.0)
        assert [(r.decision.fan, r.outcome) for r in report.results] == [(0, Outcome.APPLIED), (1, Outcome.APPLIED)]
        assert nvml.gpus[0].fan_policies == {} and (state / (FAN_STATE_FILE_NAME + ".corrupt")).exists()


class TestMetrics:
    def test_mode_target_and_monitor_only_series(self, tmp_path: Path) -> None:
        """On a hot simulated RTX 4070 in assist mode: the mode state set, a target per fan at the 75 % ceiling
        beside the measured speed; on an H100 profile the fans are monitor-only (1) and have no target."""

        from governor.backends.simulated import SimulatedBackend
        from governor.sim.profiles import load_profile
        from governor.sim.scenario import load_scenario
        from tests.builders import exposition_after

        def body(profile: str) -> str:
            clock = VirtualClock()
            backend = SimulatedBackend(load_profile(profile), load_scenario("hot"), clock)
            config = Config(state_dir=str(tmp_path / profile), runtime_dir="", fan=ASSIST)
            return exposition_after(config, backend, clock, 60)

        rtx = body("rtx4070")
        labels = 'gpu="0",uuid="GPU-sim-rtx4070-0"'
        mode = 'gpu_governor_gpu_fan_mode{gpu="0",gpu_governor_gpu_fan_mode="assist",uuid="GPU-sim-rtx4070-0"} 1.0'
        assert mode in rtx
        assert f'gpu_governor_gpu_fan_target_ratio{{fan="1",{labels}}} 0.75' in rtx
        assert f'gpu_governor_gpu_fan_speed_ratio{{fan="1",{labels}}} 0.75' in rtx
        assert f"gpu_governor_gpu_fan_monitor_only{{{labels}}} 0.0" in rtx
        h100 = body("h100-80gb")
        assert 'gpu_governor_gpu_fan_monitor_only{gpu="0",uuid="GPU-sim-h100-80gb-0"} 1.0' in h100
        assert "gpu_governor_gpu_fan_target_ratio{" not in h100


class TestConfigAndCurve:
    def test_per_gpu_override_and_its_contradiction(self) -> None:
        """A [[gpu]] fan table changes that GPU's policy only; lower_at_c at or above raise_at_c is named."""
        from governor.config import ConfigError, parse_config
        from governor.model import GpuInfo

        config = parse_config(
            {"fan": {"mode": "assist"}, "gpu": [{"index": 1, "fan": {"mode": "curve", "max_percent": 60}}]}, "t.toml"
        )
        zero, one = GpuInfo(index=0, uuid="GPU-a", name="x"), GpuInfo(index=1, uuid="GPU-b", name="x")
        assert config.policy_for(zero).fan.mode is FanMode.ASSIST and config.policy_for(zero).fan.max_percent == 75.0
        assert config.policy_for(one).fan.mode is FanMode.CURVE and config.policy_for(one).fan.max_percent == 60.0
        with pytest.raises(ConfigError) as caught:
            parse_config({"gpu": [{"index": 0, "fan": {"lower_at_c": 75.0}}]}, "t.toml")
        assert [str(i) for i in caught.value.issues] == [
            "t.toml: gpu[0].fan.lower_at_c: expected a temperature below fan.raise_at_c (70 C), got 75"
        ]

    def test_curve_drives_only_the_fans_named(self, tmp_path: Path) -> None:
        """fans = [1]: the curve sets fan 1 only; fan 0 stays with the card."""
        curve = FanPolicy(mode=FanMode.CURVE, fans=(1,), curve=((50.0, 30.0), (80.0, 70.0)))
        governor, nvml, clock = governor_for(tmp_path, consumer_card(temperature_c=65), fan=curve)
        tick(governor, clock, 0.0)
        assert nvml.gpus[0].fan_writes == [("speed", 1, 50)] and nvml.gpus[0].fan_policies == {1: 1}
