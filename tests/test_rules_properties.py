"""Properties of the thermal + power rules over any temperature series and any valid policy."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from governor.config import GpuPolicy, PowerPolicy, ThermalPolicy
from governor.model import Action, Decision, GpuInfo
from governor.rules.engine import GpuPlan, GpuRuleState, evaluate_gpu
from governor.rules.power import target_w
from tests.helpers import reading

CHANGES = {"power_step_down", "power_step_up", "power_critical"}
SETTINGS = settings(max_examples=200, deadline=None)


@dataclass(frozen=True)
class Tick:
    """One evaluated reading: its time, temperature, decisions and the target after it."""

    t_s: float
    temperature_c: float | None
    decisions: tuple[Decision, ...]
    target_w: float | None


@dataclass(frozen=True)
class Case:
    """A GPU, a valid policy and a series of (time step, temperature) readings."""

    gpu: GpuInfo
    thermal: ThermalPolicy
    power: PowerPolicy
    series: tuple[tuple[float, float | None], ...]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Any valid policy for a GPU whose range mostly holds the ladder, and readings that hit its thresholds."""
    low = draw(st.floats(50.0, 400.0))
    high = low + max(0.0, draw(st.floats(-100.0, 600.0)))
    gpu = GpuInfo(index=0, uuid="GPU-prop", name="prop", power_limit_min_w=low, power_limit_max_w=high)
    rungs = draw(st.lists(st.integers(int(low) - 20, int(high) + 20), min_size=2, max_size=5, unique=True))
    down = draw(st.floats(40.0, 100.0))
    power = PowerPolicy(
        ladder_w=tuple(float(w) for w in sorted(rungs, reverse=True)),
        step_down_at_c=down,
        step_up_at_c=down - draw(st.floats(0.5, 30.0)),
        debounce_samples=draw(st.integers(1, 5)),
        dwell_s=draw(st.floats(0.0, 120.0)),
        min_change_interval_s=draw(st.floats(0.0, 120.0)),
    )
    warning = draw(st.floats(40.0, 90.0))
    gaps = draw(st.lists(st.floats(0.5, 15.0), min_size=3, max_size=3))
    thermal = ThermalPolicy(
        warning_c=warning,
        hot_c=warning + gaps[0],
        throttle_c=warning + gaps[0] + gaps[1],
        critical_c=warning + sum(gaps),
        hysteresis_c=draw(st.floats(0.0, 10.0)),
    )
    edges = [power.step_up_at_c, power.step_down_at_c, thermal.critical_c]
    near = st.sampled_from([e + d for e in edges for d in (-0.5, 0.0, 0.1, 0.5)])
    temperature = st.none() | st.floats(20.0, 120.0) | near
    # Phases of steady readings (with noise), as a real GPU heats, idles and loses its sensor.
    phases = draw(
        st.lists(
            st.tuples(temperature, st.integers(1, 25), st.floats(0.1, 20.0), st.just(0.0) | st.floats(0.0, 4.0)),
            min_size=1,
            max_size=8,
        )
    )
    series: list[tuple[float, float | None]] = []
    for level, count, dt, noise in phases:
        for i in range(count):
            wobble = noise * ((i * 7919) % 13 - 6) / 6.0  # deterministic noise in [-noise, noise]
            series.append((dt, None if level is None else level + wobble))
    return Case(gpu, thermal, power, tuple(series))


def run(case: Case) -> list[Tick]:
    """Evaluate the case's series; the enforced limit starts at the maximum and follows every set."""
    gpu = case.gpu
    plan = GpuPlan.build(gpu, GpuPolicy(thermal=case.thermal, power=case.power))
    state = GpuRuleState()
    enforced = gpu.power_limit_max_w
    t = 0.0
    ticks = []
    for dt, temp in case.series:
        t += dt
        state, decisions = evaluate_gpu(reading(temp, enforced, gpu), plan, state, t)
        for d in decisions:
            if d.action is Action.SET_POWER_LIMIT:
                assert isinstance(d.to_value, float)
                enforced = d.to_value
        ticks.append(Tick(t, temp, tuple(decisions), target_w(state.ladder, plan.ladder_w)))
    return ticks


def ladder_of(case: Case) -> tuple[float, ...]:
    """The case's ladder clamped to its GPU's range."""
    return GpuPlan.build(case.gpu, GpuPolicy(power=case.power)).ladder_w


class TestLadderProperties:
    """Invariants of the thermal zone and power ladder rules under arbitrary readings."""

    @SETTINGS
    @given(cases())
    def test_target_within_range_and_on_ladder(self, case: Case) -> None:
        """The target is always None or a rung of the clamped ladder inside the GPU's allowed range."""
        ladder = ladder_of(case)
        low, high = case.gpu.power_limit_min_w, case.gpu.power_limit_max_w
        assert low is not None
        assert high is not None
        for tick in run(case):
            if tick.target_w is not None:
                assert tick.target_w in ladder
                assert low <= tick.target_w <= high
            for d in tick.decisions:
                if d.action is Action.SET_POWER_LIMIT:
                    assert d.to_value in ladder

    @SETTINGS
    @given(cases())
    def test_no_step_up_unless_cool(self, case: Case) -> None:
        """A step up only happens on a reading at or below step_up_at_c, never on a missing one."""
        for tick in run(case):
            if any(d.rule == "power_step_up" for d in tick.decisions):
                assert tick.temperature_c is not None
                assert tick.temperature_c <= case.power.step_up_at_c

    @SETTINGS
    @given(cases())
    def test_missing_reading_holds_target(self, case: Case) -> None:
        """A tick with no temperature leaves the target exactly as it was and sets nothing."""
        previous: float | None = None
        for tick in run(case):
            if tick.temperature_c is None:
                assert tick.target_w == previous
                assert all(d.action is not Action.SET_POWER_LIMIT for d in tick.decisions)
            previous = tick.target_w

    @SETTINGS
    @given(cases())
    def test_changes_respect_min_interval(self, case: Case) -> None:
        """No two target changes are closer than min_change_interval_s, unless the later enters critical."""
        last: float | None = None
        for tick in run(case):
            changes = [d for d in tick.decisions if d.rule in CHANGES]
            assert len(changes) <= 1
            for d in changes:
                if last is not None and d.rule != "power_critical":
                    assert tick.t_s - last >= case.power.min_change_interval_s
                last = tick.t_s

    @SETTINGS
    @given(cases())
    def test_steps_move_one_rung(self, case: Case) -> None:
        """A governed step moves exactly one rung; a critical jump lands on the lowest rung."""
        ladder = ladder_of(case)
        previous: float | None = None
        for tick in run(case):
            for d in tick.decisions:
                if d.rule == "power_critical":
                    assert d.to_value == ladder[-1]
                elif d.rule in ("power_step_down", "power_step_up") and previous is not None:
                    step = 1 if d.rule == "power_step_down" else -1
                    assert ladder.index(tick.target_w) == ladder.index(previous) + step
            previous = tick.target_w

    @SETTINGS
    @given(cases())
    def test_no_set_ever_raises_during_heat(self, case: Case) -> None:
        """A step down or critical jump never asks for more than the limit in force."""
        enforced = case.gpu.power_limit_max_w
        assert enforced is not None
        for tick in run(case):
            for d in tick.decisions:
                if d.rule in ("power_step_down", "power_critical"):
                    assert isinstance(d.to_value, float)
                    assert d.to_value <= enforced + 1.0
                if d.action is Action.SET_POWER_LIMIT:
                    assert isinstance(d.to_value, float)
                    enforced = d.to_value
