"""Thermal model and throughput law: physics sanity, exact integration, workload kinds."""

from __future__ import annotations

import itertools
import math

import pytest

from governor.sim.thermal import ThermalParams, ThermalState, steady_temperature_c, step_matrix
from governor.sim.workload import PERF_EXPONENTS, throughput_ratio

PARAMS = ThermalParams(r_die_c_per_w=0.06, c_die_j_per_c=25.0, r_sink_c_per_w=0.2, c_sink_j_per_c=300.0)


def run(state: ThermalState, power_w: float, ambient_c: float, seconds: float) -> list[float]:
    return [state.step(power_w, ambient_c) for _ in range(round(seconds / state.step_s))]


class TestThermalState:
    def test_heats_under_load(self) -> None:
        """From idle equilibrium, a 200 W load raises the die temperature monotonically by tens of degrees."""
        state = ThermalState.at_steady_state(PARAMS, 0.5, 12.0, 30.0)
        start = state.die_c
        temps = run(state, 200.0, 30.0, 300.0)
        assert all(b >= a for a, b in itertools.pairwise(temps))
        assert temps[-1] > start + 40.0

    def test_cools_toward_ambient_at_idle(self) -> None:
        """With no power a hot GPU cools monotonically to the ambient temperature and never below it."""
        state = ThermalState(PARAMS, 0.5, die_c=85.0, sink_c=80.0)
        temps = run(state, 0.0, 25.0, 3000.0)
        assert all(b <= a for a, b in itertools.pairwise(temps))
        assert min(temps) >= 25.0
        assert temps[-1] == pytest.approx(25.0, abs=0.01)

    def test_steady_state_is_r_times_p_plus_ambient(self) -> None:
        """Under constant power the die settles at T_amb + P * (R_die + R_sink)."""
        state = ThermalState.at_steady_state(PARAMS, 0.5, 0.0, 30.0)
        run(state, 180.0, 30.0, 3000.0)
        assert state.die_c == pytest.approx(30.0 + 180.0 * 0.26, abs=1e-6)
        assert steady_temperature_c(PARAMS, 180.0, 30.0) == pytest.approx(76.8)

    def test_steady_state_is_a_fixed_point(self) -> None:
        """A GPU at equilibrium stays exactly there."""
        state = ThermalState.at_steady_state(PARAMS, 0.5, 150.0, 20.0)
        before = (state.die_c, state.sink_c)
        run(state, 150.0, 20.0, 100.0)
        assert (state.die_c, state.sink_c) == pytest.approx(before, abs=1e-9)

    def test_integration_is_exact_for_any_step(self) -> None:
        """One 1 s step equals two 0.5 s steps and four 0.25 s steps (exact, not Euler)."""
        results = []
        for step_s in (1.0, 0.5, 0.25):
            state = ThermalState(PARAMS, step_s, die_c=40.0, sink_c=38.0)
            run(state, 200.0, 30.0, 10.0)
            results.append((state.die_c, state.sink_c))
        assert results[1] == pytest.approx(results[0], abs=1e-9)
        assert results[2] == pytest.approx(results[0], abs=1e-9)

    def test_stiff_die_node_stays_stable(self) -> None:
        """A die time constant far below the step (1e-4 s vs 1 s) neither oscillates nor diverges."""
        stiff = ThermalParams(0.03, 0.003, 0.03, 600.0)
        state = ThermalState.at_steady_state(stiff, 1.0, 70.0, 30.0)
        temps = run(state, 700.0, 30.0, 200.0)
        assert all(math.isfinite(t) for t in temps)
        assert all(b >= a - 1e-9 for a, b in itertools.pairwise(temps))

    def test_zero_step_is_identity(self) -> None:
        """The transition over 0 s is the identity matrix."""
        m = step_matrix(PARAMS, 0.0)
        assert (m.e11, m.e12, m.e21, m.e22) == pytest.approx((1.0, 0.0, 0.0, 1.0))

    @pytest.mark.parametrize("field", ["r_die_c_per_w", "c_die_j_per_c", "r_sink_c_per_w", "c_sink_j_per_c"])
    def test_rejects_non_positive_constants(self, field: str) -> None:
        """Every resistance and capacity must be a positive number; the error names the field."""
        values = {"r_die_c_per_w": 0.1, "c_die_j_per_c": 1.0, "r_sink_c_per_w": 0.1, "c_sink_j_per_c": 1.0}
        values[field] = 0.0
        with pytest.raises(ValueError, match=field):
            ThermalParams(**values)


class TestThroughput:
    def test_compute_slows_more_than_memory_bound_work(self) -> None:
        """At 80 % of demand compute runs at 0.8**0.55 and LLM decoding at 0.8**0.15 of full speed."""
        compute = throughput_ratio(160.0, 200.0, PERF_EXPONENTS["compute"])
        memory = throughput_ratio(160.0, 200.0, PERF_EXPONENTS["memory"])
        assert compute == pytest.approx(0.8**0.55)
        assert memory == pytest.approx(0.8**0.15)
        assert memory > 0.96 > 0.90 > compute

    def test_uncapped_work_runs_at_full_speed(self) -> None:
        """Power at or above demand gives throughput 1; no demand gives 0."""
        assert throughput_ratio(200.0, 150.0, 0.55) == 1.0
        assert throughput_ratio(12.0, 0.0, 0.55) == 0.0

    def test_throughput_grows_with_power(self) -> None:
        """For every kind, more power never means less throughput."""
        for exponent in PERF_EXPONENTS.values():
            speeds = [throughput_ratio(p, 300.0, exponent) for p in range(0, 320, 20)]
            assert all(b >= a for a, b in itertools.pairwise(speeds))
