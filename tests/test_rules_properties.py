"""Properties of the thermal + power rules over any temperature series and any valid policy.

Each property counts the examples in which the branch its claim is about happened (a step
up, a missing reading under a target, two changes in a row...) and fails when that share
is below MIN_SHARE: the strategy builds most series around a heat-then-cool cycle long
enough for the debounce, dwell and minimum interval to pass, so the branches happen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from governor.config import GpuPolicy, PowerPolicy, ThermalPolicy
from governor.model import Action, Decision, GpuInfo
from governor.rules.engine import GpuPlan, GpuRuleState, evaluate_gpu
from governor.rules.power import target_w
from tests.helpers import reading
from tests.support import Branch

CHANGES = {"power_step_down", "power_step_up", "power_critical"}
SETTINGS = settings(
    max_examples=200, deadline=None, derandomize=True
)  # the same examples each run: the share checks below cannot flake
MIN_SHARE = 0.2
"""Each property's branch must happen in at least this share of the examples."""


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
    if draw(st.integers(0, 9)) < 9:  # nine in ten (and the simplest example): a heat-then-cool cycle at the end
        series.extend(draw(cycles(power, thermal)))
        series += [(1.0, None)] * draw(st.integers(0, 3))  # and maybe the sensor lost at the end
    return Case(gpu, thermal, power, tuple(series))


def cycles(power: PowerPolicy, thermal: ThermalPolicy) -> st.SearchStrategy[list[tuple[float, float | None]]]:
    """A heat phase, an optional sensor loss, and a cool phase, each long enough for the debounce,
    the dwell and the minimum interval to pass once per rung: steps down (or a critical jump),
    missing readings under a target, and steps up back towards the top."""

    @st.composite
    def build(draw: st.DrawFn) -> list[tuple[float, float | None]]:
        hot = draw(
            st.sampled_from([power.step_down_at_c, power.step_down_at_c + 0.5, thermal.critical_c + 1.0])
            | st.floats(power.step_down_at_c, max(power.step_down_at_c, thermal.critical_c))
        )
        up = power.step_up_at_c
        cool = draw(st.sampled_from([up, up - 0.5]) | st.floats(min(20.0, up), up))
        dt = draw(st.floats(5.0, 20.0))
        per_rung = power.debounce_samples + math.ceil((power.dwell_s + power.min_change_interval_s) / dt) + 1
        rungs = draw(st.integers(1, len(power.ladder_w)))
        series: list[tuple[float, float | None]] = [(dt, hot)] * (per_rung * rungs)
        series += [(dt, None)] * draw(st.integers(0, 3))
        series += [(dt, cool)] * (per_rung * rungs)
        return series

    return build()


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

    def test_target_within_range_and_on_ladder(self) -> None:
        """The target is always None or a rung of the clamped ladder inside the GPU's allowed range."""
        branch = Branch("a target")

        @SETTINGS
        @given(cases())
        def check(case: Case) -> None:
            ladder = ladder_of(case)
            low, high = case.gpu.power_limit_min_w, case.gpu.power_limit_max_w
            assert low is not None
            assert high is not None
            targeted = False
            for tick in run(case):
                if tick.target_w is not None:
                    targeted = True
                    assert tick.target_w in ladder
                    assert low <= tick.target_w <= high
                for d in tick.decisions:
                    if d.action is Action.SET_POWER_LIMIT:
                        assert d.to_value in ladder
            branch.saw(targeted)

        check()
        branch.require(MIN_SHARE)

    def test_no_step_up_unless_cool(self) -> None:
        """A step up only happens on a reading at or below step_up_at_c, never on a missing one."""
        branch = Branch("a step up")

        @SETTINGS
        @given(cases())
        def check(case: Case) -> None:
            stepped = False
            for tick in run(case):
                if any(d.rule == "power_step_up" for d in tick.decisions):
                    stepped = True
                    assert tick.temperature_c is not None
                    assert tick.temperature_c <= case.power.step_up_at_c
            branch.saw(stepped)

        check()
        branch.require(MIN_SHARE)

    def test_missing_reading_holds_target(self) -> None:
        """A tick with no temperature leaves the target exactly as it was and sets nothing."""
        branch = Branch("a missing reading under a target")

        @SETTINGS
        @given(cases())
        def check(case: Case) -> None:
            previous: float | None = None
            held = False
            for tick in run(case):
                if tick.temperature_c is None:
                    held = held or previous is not None
                    assert tick.target_w == previous
                    assert all(d.action is not Action.SET_POWER_LIMIT for d in tick.decisions)
                previous = tick.target_w
            branch.saw(held)

        check()
        branch.require(MIN_SHARE)

    def test_changes_respect_min_interval(self) -> None:
        """No two target changes are closer than min_change_interval_s, unless the later enters critical."""
        branch = Branch("a governed change after another change")

        @SETTINGS
        @given(cases())
        def check(case: Case) -> None:
            last: float | None = None
            compared = False
            for tick in run(case):
                changes = [d for d in tick.decisions if d.rule in CHANGES]
                assert len(changes) <= 1
                for d in changes:
                    if last is not None and d.rule != "power_critical":
                        compared = True
                        assert tick.t_s - last >= case.power.min_change_interval_s
                    last = tick.t_s
            branch.saw(compared)

        check()
        branch.require(MIN_SHARE)

    def test_steps_move_one_rung(self) -> None:
        """A governed step moves exactly one rung; a critical jump lands on the lowest rung."""
        branch = Branch("a step or critical jump")

        @SETTINGS
        @given(cases())
        def check(case: Case) -> None:
            ladder = ladder_of(case)
            previous: float | None = None
            moved = False
            for tick in run(case):
                for d in tick.decisions:
                    if d.rule == "power_critical":
                        moved = True
                        assert d.to_value == ladder[-1]
                    elif d.rule in ("power_step_down", "power_step_up") and previous is not None:
                        moved = True
                        step = 1 if d.rule == "power_step_down" else -1
                        assert ladder.index(tick.target_w) == ladder.index(previous) + step
                previous = tick.target_w
            branch.saw(moved)

        check()
        branch.require(MIN_SHARE)

    def test_no_set_ever_raises_during_heat(self) -> None:
        """A step down or critical jump never asks for more than the limit in force."""
        branch = Branch("a step down or critical jump")

        @SETTINGS
        @given(cases())
        def check(case: Case) -> None:
            enforced = case.gpu.power_limit_max_w
            assert enforced is not None
            lowered = False
            for tick in run(case):
                for d in tick.decisions:
                    if d.rule in ("power_step_down", "power_critical"):
                        lowered = True
                        assert isinstance(d.to_value, float)
                        assert d.to_value <= enforced + 1.0
                    if d.action is Action.SET_POWER_LIMIT:
                        assert isinstance(d.to_value, float)
                        enforced = d.to_value
            branch.saw(lowered)

        check()
        branch.require(MIN_SHARE)
