"""The shipped scenarios do what docs/simulation.md promises on the shipped profiles."""

from __future__ import annotations

from governor.backends.simulated import SimulatedBackend, build_simulated_backend
from governor.clock import VirtualClock
from governor.config import SimulationConfig
from governor.model import GpuHealth, Snapshot
from governor.sim.scenario import GIB


def start(scenario: str, **kwargs: object) -> tuple[SimulatedBackend, VirtualClock]:
    clock = VirtualClock()
    return build_simulated_backend(SimulationConfig(scenario=scenario, **kwargs), clock), clock  # type: ignore[arg-type]


def run(b: SimulatedBackend, clock: VirtualClock, seconds: int) -> list[Snapshot]:
    """One read per simulated second, as a 1 Hz daemon would."""
    snaps = []
    for _ in range(seconds):
        clock.advance(1.0)
        snaps.append(b.read())
    return snaps


def temps(snaps: list[Snapshot], gpu: int = 0) -> list[float]:
    out = []
    for snap in snaps:
        t = snap.gpus[gpu].temperature_c
        assert t is not None
        out.append(t)
    return out


class TestSustainedInference:
    def test_default_limit_exceeds_80c(self) -> None:
        """On rtx4070 with no governor (200 W) sustained inference passes 80 C in every load phase."""
        b, clock = start("sustained-inference")
        t = temps(run(b, clock, 1800))
        assert max(t[:600]) > 80.0
        assert max(t[900:1500]) > 80.0

    def test_fixed_180w_stays_below_80c(self) -> None:
        """At a fixed 180 W the same scenario never reaches 80 C over two cycles."""
        b, clock = start("sustained-inference")
        b.set_power_limit(b.gpus()[0].uuid, 180.0)
        t = temps(run(b, clock, 1800))
        assert max(t) < 80.0
        assert max(t) >= 75.0  # still hot enough that a governor would not step back up under load

    def test_cycles_pass_75c_then_cool_below_65c(self) -> None:
        """Each cycle passes 75 C under load, then stays below 65 C for over 60 s (a step-up dwell)."""
        b, clock = start("sustained-inference")
        t = temps(run(b, clock, 1800))
        for cycle in (0, 900):
            assert max(t[cycle : cycle + 600]) > 75.0
            quiet = t[cycle + 600 : cycle + 900]
            below = [i for i, x in enumerate(quiet) if x < 65.0]
            assert below and len(quiet) - below[0] > 120
            assert all(x < 65.0 for x in quiet[below[0] :])

    def test_memory_bound_work_barely_slows_at_180w(self) -> None:
        """Capping this LLM-decoding scenario at 180 W loses under 2 % of its work and saves energy."""
        results = []
        for limit in (200.0, 180.0):
            b, clock = start("sustained-inference")
            b.set_power_limit(b.gpus()[0].uuid, limit)
            clock.advance(1800.0)
            results.append(b.stats(0))
        full, capped = results
        assert capped.work_s > 0.98 * full.work_s
        assert capped.energy_j < 0.95 * full.energy_j


class TestOtherScenarios:
    def test_hot_heats_fast_and_stays_hot(self) -> None:
        """'hot' on rtx4070 reaches 76 C within 60 s and stays at or above 76 C even when capped at 180 W."""
        b, clock = start("hot")
        t = temps(run(b, clock, 60))
        assert max(t) >= 76.0
        b.set_power_limit(b.gpus()[0].uuid, 180.0)
        assert min(temps(run(b, clock, 1200))) >= 76.0

    def test_idle_stays_cool(self) -> None:
        """'idle' keeps the GPU at idle power, a few degrees above the 25 C room, with no processes."""
        b, clock = start("idle")
        snaps = run(b, clock, 600)
        assert max(temps(snaps)) <= 30.0
        assert snaps[-1].gpus[0].processes == ()
        assert b.stats(0).work_s == 0.0

    def test_dual_inference_game(self) -> None:
        """'dual-inference-game' puts primary 6 GiB, secondary 3 GiB and game 2 GiB on GPU 0."""
        b, clock = start("dual-inference-game")
        procs = run(b, clock, 1)[0].gpus[0].processes
        assert procs is not None
        assert {p.name: p.used_memory_bytes for p in procs} == {
            "primary": 6 * GIB,
            "secondary": 3 * GIB,
            "game": 2 * GIB,
        }

    def test_leaky_process_grows_past_3gib(self) -> None:
        """'leaky-process': 'leaky' is under 3 GiB at 30 s, over it by 45 s, and stops at 8 GiB."""
        b, clock = start("leaky-process")
        snaps = run(b, clock, 300)

        def leaky(i: int) -> int:
            procs = snaps[i].gpus[0].processes or ()
            size = next(p.used_memory_bytes for p in procs if p.name == "leaky")
            assert size is not None
            return size

        assert leaky(29) < 3 * GIB < leaky(44)
        assert leaky(299) == 8 * GIB

    def test_gpu_lost(self) -> None:
        """'gpu-lost' with two GPUs: GPU 1 turns LOST at 120 s and stays so; GPU 0 stays OK."""
        b, clock = start("gpu-lost", gpu_count=2)
        snaps = run(b, clock, 300)
        assert snaps[118].gpus[1].health is GpuHealth.OK
        assert all(s.gpus[1].health is GpuHealth.LOST for s in snaps[119:])
        assert all(s.gpus[0].health is GpuHealth.OK for s in snaps)

    def test_h100_under_hot_scenario(self) -> None:
        """On h100-80gb 'hot' holds the 700 W cap and settles at 35 C + 700 W * R_total (72 C)."""
        b, clock = start("hot", profile="h100-80gb")
        snaps = run(b, clock, 300)
        expected = 35.0 + 700.0 * b.profile.thermal.r_total_c_per_w
        assert abs(temps(snaps)[-1] - expected) <= 1.0
        assert snaps[-1].gpus[0].clock_event_reasons == 0x4
