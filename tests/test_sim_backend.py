"""The simulated backend: power and temperature physics, limits, state file, faults, processes, stats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from governor.backends import Backend, BackendError, GpuLostError, SetLimitFailed, SetLimitRefused
from governor.backends.simulated import SYNTHETIC_PID_BASE, SimulatedBackend, build_simulated_backend
from governor.clock import VirtualClock
from governor.config import ConfigError, SimulationConfig
from governor.model import GpuHealth
from governor.sim import SimDataError, load_profile
from governor.sim.scenario import GIB, Load, Phase, Scenario, ScenarioEvent, ScenarioProcess
from governor.sim.workload import PERF_EXPONENTS

RTX = load_profile("rtx4070")


def load(demand_w: float, kind: str = "compute") -> Load:
    return Load(demand_w, None, kind, PERF_EXPONENTS[kind], 1.0)


def scenario(
    demand_w: float = 150.0,
    kind: str = "compute",
    *,
    noise_w: float = 0.0,
    ambient_c: float = 30.0,
    processes: tuple[ScenarioProcess, ...] = (),
    events: tuple[ScenarioEvent, ...] = (),
) -> Scenario:
    return Scenario(
        name="test",
        description="",
        phases=(Phase("only", 3600.0, load(demand_w, kind)),),
        processes=processes,
        events=events,
        ambient_c=ambient_c,
        repeat=False,
        power_noise_w=noise_w,
    )


def backend(sc: Scenario | None = None, **kwargs: object) -> tuple[SimulatedBackend, VirtualClock]:
    clock = VirtualClock()
    return SimulatedBackend(RTX, sc or scenario(), clock, **kwargs), clock  # type: ignore[arg-type]


def uuid(b: SimulatedBackend, index: int = 0) -> str:
    return b.gpus()[index].uuid


class TestProtocolAndFacts:
    def test_is_a_backend(self) -> None:
        """SimulatedBackend satisfies the Backend Protocol and is named 'simulated'."""
        b, _ = backend()
        assert isinstance(b, Backend)
        assert b.name == "simulated"

    def test_gpu_facts(self) -> None:
        """GPUs get deterministic UUIDs, the profile's marketing name and its limits."""
        b, _ = backend(gpu_count=3)
        infos = b.gpus()
        assert [i.uuid for i in infos] == ["GPU-sim-rtx4070-0", "GPU-sim-rtx4070-1", "GPU-sim-rtx4070-2"]
        assert {i.name for i in infos} == {"NVIDIA GeForce RTX 4070"}
        assert infos[1].power_limit_default_w == 200.0
        assert infos[1].memory_total_bytes == RTX.memory_total_bytes

    def test_time_scale(self) -> None:
        """With time_scale 10, 5 clock seconds are 50 simulated seconds, reported as Snapshot.t_s."""
        b, clock = backend(time_scale=10.0)
        clock.advance(5.0)
        snap = b.read()
        assert snap.t_s == pytest.approx(50.0)
        assert snap.wall_time_s == clock.wall()
        assert b.stats(0).elapsed_s == pytest.approx(50.0)

    def test_closed_backend_refuses_reads(self) -> None:
        """After close() (idempotent) a read raises BackendError."""
        b, _ = backend()
        b.close()
        b.close()
        with pytest.raises(BackendError):
            b.read()


class TestPower:
    def test_power_is_demand_under_the_limit(self) -> None:
        """A 150 W demand under a 200 W limit draws 150 W: no power-cap reason."""
        b, clock = backend(scenario(150.0))
        clock.advance(10.0)
        gpu = b.read().gpus[0]
        assert gpu.power_w == 150.0
        assert gpu.power_limit_w == 200.0
        assert gpu.clock_event_reasons == 0
        assert gpu.utilization_gpu_ratio == 1.0

    def test_power_is_capped_by_the_limit(self) -> None:
        """Lowering the limit to 120 W caps a 150 W demand at 120 W and sets the SW power cap bit 0x4."""
        b, clock = backend(scenario(150.0))
        b.set_power_limit(uuid(b), 120.0)
        clock.advance(10.0)
        gpu = b.read().gpus[0]
        assert gpu.power_w == 120.0
        assert gpu.clock_event_reasons == 0x4

    def test_idle_floor(self) -> None:
        """With no work the GPU draws its idle power and reports the idle reason 0x1."""
        b, clock = backend(scenario(0.0))
        clock.advance(10.0)
        gpu = b.read().gpus[0]
        assert gpu.power_w == RTX.idle_power_w
        assert gpu.clock_event_reasons == 0x1
        assert gpu.utilization_gpu_ratio == 0.0

    def test_noise_is_small(self) -> None:
        """With 1 W of noise a capped GPU reads within 5 W of its limit, and not always exactly at it."""
        b, clock = backend(scenario(250.0, noise_w=1.0))
        powers = []
        for _ in range(200):
            clock.advance(1.0)
            power = b.read().gpus[0].power_w
            assert power is not None
            powers.append(power)
        assert all(abs(p - 200.0) < 5.0 for p in powers)
        assert len(set(powers)) > 100


class TestTemperature:
    def test_heats_then_settles_at_r_times_p_plus_ambient(self) -> None:
        """Under 150 W in 30 C the GPU heats from near idle to 30 + 150 * 0.26 = 69 C."""
        b, clock = backend(scenario(150.0))
        start = b.read().gpus[0].temperature_c
        clock.advance(1800.0)
        assert start is not None and start < 35.0
        assert b.read().gpus[0].temperature_c == 69.0
        assert b.die_temperature_c(0) == pytest.approx(69.0, abs=1e-6)

    def test_lower_limit_gives_lower_steady_temperature(self) -> None:
        """The same 250 W demand settles at 82 C under a 200 W limit and 76.8 C under 180 W."""
        hot, clock_hot = backend(scenario(250.0))
        cool, clock_cool = backend(scenario(250.0))
        cool.set_power_limit(uuid(cool), 180.0)
        clock_hot.advance(1800.0)
        clock_cool.advance(1800.0)
        assert hot.die_temperature_c(0) == pytest.approx(82.0, abs=1e-3)
        assert cool.die_temperature_c(0) == pytest.approx(76.8, abs=1e-3)

    def test_temperatures_are_whole_degrees(self) -> None:
        """Readings are whole degrees, as NVML reports them."""
        b, clock = backend()
        for _ in range(30):
            clock.advance(3.3)
            temp = b.read().gpus[0].temperature_c
            assert temp is not None and temp == int(temp)

    def test_thermal_slowdown(self) -> None:
        """In a 45 C room at 200 W (steady 97 C) the GPU throttles itself at its 90 C slowdown: bit 0x20."""
        b, clock = backend(scenario(250.0, ambient_c=45.0))
        clock.advance(1800.0)
        gpu = b.read().gpus[0]
        assert gpu.temperature_c is not None and 89.0 <= gpu.temperature_c <= 91.0
        assert gpu.power_w is not None and gpu.power_w < 200.0
        assert gpu.clock_event_reasons is not None and gpu.clock_event_reasons & 0x20
        assert gpu.health is GpuHealth.OK

    def test_ambient_override(self) -> None:
        """The config's ambient_c overrides the scenario's: an idle GPU sits at ambient + 12 W * 0.26."""
        sc = scenario(0.0)
        b, clock = backend(sc, ambient_c=20.0)
        clock.advance(600.0)
        assert b.die_temperature_c(0) == pytest.approx(20.0 + 12.0 * 0.26, abs=1e-6)

    def test_read_pattern_does_not_change_the_physics(self) -> None:
        """Reading every 0.3 s or every 70 s gives the same state at t = 700 s, noise included."""
        results = []
        for interval in (0.3, 70.0):
            b, clock = backend(scenario(250.0, noise_w=2.0), seed=7)
            while clock.monotonic() < 700.0 - 1e-9:
                clock.advance(min(interval, 700.0 - clock.monotonic()))
                b.read()
            clock.advance_to(700.0)
            results.append((b.die_temperature_c(0), b.stats(0)))
        assert results[0] == results[1]


class TestDeterminism:
    def test_same_seed_same_run(self) -> None:
        """Two runs with one seed give identical snapshots."""
        runs = []
        for _ in range(2):
            b, clock = backend(scenario(250.0, noise_w=2.0), seed=3, gpu_count=2)
            snaps = []
            for _ in range(100):
                clock.advance(1.0)
                snaps.append(b.read())
            runs.append(snaps)
        assert runs[0] == runs[1]

    def test_seed_changes_the_noise(self) -> None:
        """Different seeds give different power noise; GPUs of one run differ from each other too."""
        powers = {}
        for seed in (1, 2):
            b, clock = backend(scenario(250.0, noise_w=2.0), seed=seed, gpu_count=2)
            clock.advance(10.0)
            snap = b.read()
            powers[seed] = (snap.gpus[0].power_w, snap.gpus[1].power_w)
        assert powers[1] != powers[2]
        assert powers[1][0] != powers[1][1]


class TestSetPowerLimit:
    def test_out_of_range_fails_and_changes_nothing(self) -> None:
        """Like NVML, a limit outside 100-220 W raises SetLimitFailed; nothing is clamped."""
        b, _ = backend()
        for bad in (99.0, 220.5, float("nan")):
            with pytest.raises(SetLimitFailed):
                b.set_power_limit(uuid(b), bad)
        assert b.read().gpus[0].power_limit_w == 200.0

    def test_edges_and_milliwatts(self) -> None:
        """Both range ends are accepted; limits are kept in whole milliwatts."""
        b, _ = backend()
        b.set_power_limit(uuid(b), 100.0)
        b.set_power_limit(uuid(b), 220.0)
        b.set_power_limit(uuid(b), 180.00049)
        assert b.read().gpus[0].power_limit_w == 180.0

    def test_unknown_uuid_is_refused(self) -> None:
        """A UUID the backend does not have raises SetLimitRefused."""
        b, _ = backend()
        with pytest.raises(SetLimitRefused):
            b.set_power_limit("GPU-nope", 180.0)

    def test_external_change_is_visible(self) -> None:
        """Another agent's limit change shows in the enforced limit (for drift tests)."""
        b, _ = backend()
        b.external_set_power_limit(0, 150.0)
        assert b.read().gpus[0].power_limit_w == 150.0


class TestStateFile:
    def test_limits_survive_a_restart(self, tmp_path: Path) -> None:
        """A second backend on the same state file starts at the limits the first one set."""
        path = tmp_path / "hw.json"
        first, _ = backend(gpu_count=2, state_file=path)
        first.set_power_limit(uuid(first, 1), 180.0)
        first.close()
        second, _ = backend(gpu_count=2, state_file=path)
        limits = [g.power_limit_w for g in second.read().gpus]
        assert limits == [200.0, 180.0]
        assert second.state_warning is None

    def test_written_atomically_as_json(self, tmp_path: Path) -> None:
        """The state file is whole JSON after each change and no temporary file is left behind."""
        path = tmp_path / "hw.json"
        b, _ = backend(state_file=path)
        for limit in (190.0, 170.0):
            b.set_power_limit(uuid(b), limit)
            data = json.loads(path.read_text())
            assert data["power_limits_w"] == {"GPU-sim-rtx4070-0": limit}
        assert os.listdir(tmp_path) == ["hw.json"]

    def test_no_file_means_defaults(self, tmp_path: Path) -> None:
        """A missing state file means default limits and no warning; nothing is written until a change."""
        path = tmp_path / "hw.json"
        b, _ = backend(state_file=path)
        assert b.read().gpus[0].power_limit_w == 200.0
        assert b.state_warning is None
        assert not path.exists()

    def test_corrupt_file_warns_and_starts_from_defaults(self, tmp_path: Path) -> None:
        """A corrupt state file gives default limits and a state_warning naming it; a change repairs it."""
        path = tmp_path / "hw.json"
        path.write_text("{not json")
        b, _ = backend(state_file=path)
        assert b.read().gpus[0].power_limit_w == 200.0
        assert b.state_warning is not None and str(path) in b.state_warning and "not JSON" in b.state_warning
        b.set_power_limit(uuid(b), 170.0)
        assert json.loads(path.read_text())["power_limits_w"]["GPU-sim-rtx4070-0"] == 170.0

    def test_out_of_range_entry_warns(self, tmp_path: Path) -> None:
        """A saved limit outside the profile's range is ignored for that GPU, with a warning."""
        path = tmp_path / "hw.json"
        doc = {
            "format": "gpu-governor-simulated-hardware",
            "version": 1,
            "power_limits_w": {"GPU-sim-rtx4070-0": 700.0},
        }
        path.write_text(json.dumps(doc))
        b, _ = backend(state_file=path)
        assert b.read().gpus[0].power_limit_w == 200.0
        assert b.state_warning is not None and "GPU-sim-rtx4070-0" in b.state_warning

    def test_other_gpus_entries_are_kept(self, tmp_path: Path) -> None:
        """Entries for GPUs this run lacks survive a rewrite (a later run with more GPUs meets them)."""
        path = tmp_path / "hw.json"
        big, _ = backend(gpu_count=2, state_file=path)
        big.set_power_limit(uuid(big, 1), 150.0)
        small, _ = backend(gpu_count=1, state_file=path)
        small.set_power_limit(uuid(small, 0), 160.0)
        assert json.loads(path.read_text())["power_limits_w"] == {
            "GPU-sim-rtx4070-0": 160.0,
            "GPU-sim-rtx4070-1": 150.0,
        }

    def test_unwritable_state_fails_the_set(self, tmp_path: Path) -> None:
        """When the state cannot be saved the set fails with SetLimitFailed and the limit stays."""
        b, _ = backend(state_file=tmp_path / "missing-dir" / "hw.json")
        with pytest.raises(SetLimitFailed, match="cannot save"):
            b.set_power_limit(uuid(b), 180.0)
        assert b.read().gpus[0].power_limit_w == 200.0


class TestFaults:
    def test_lost(self) -> None:
        """A lost GPU reads LOST with an error and no values and raises GpuLostError; others carry on."""
        b, clock = backend(gpu_count=2)
        b.inject_fault(1, "lost")
        clock.advance(5.0)
        ok, lost = b.read().gpus
        assert lost.health is GpuHealth.LOST and lost.error
        assert (lost.temperature_c, lost.power_w, lost.processes, lost.memory_used_bytes) == (
            None,
            None,
            None,
            None,
        )
        assert ok.health is GpuHealth.OK and ok.temperature_c is not None
        with pytest.raises(GpuLostError):
            b.set_power_limit(uuid(b, 1), 180.0)
        b.set_power_limit(uuid(b, 0), 180.0)

    def test_lost_gpu_does_no_work(self) -> None:
        """While lost a GPU draws no energy and does no work."""
        b, clock = backend()
        b.inject_fault(0, "lost")
        clock.advance(100.0)
        stats = b.stats(0)
        assert (stats.energy_j, stats.work_s) == (0.0, 0.0)

    def test_temperature_unsupported(self) -> None:
        """temperature_unsupported reads temperature None (never 0) and health DEGRADED; other values stay."""
        b, clock = backend()
        b.inject_fault(0, "temperature_unsupported")
        clock.advance(1.0)
        gpu = b.read().gpus[0]
        assert gpu.temperature_c is None
        assert gpu.health is GpuHealth.DEGRADED
        assert gpu.power_w is not None

    def test_set_limit_refused_and_cleared(self) -> None:
        """set_limit_refused makes setting raise SetLimitRefused; clearing the fault allows it again."""
        b, _ = backend()
        b.inject_fault(0, "set_limit_refused")
        with pytest.raises(SetLimitRefused):
            b.set_power_limit(uuid(b), 180.0)
        b.inject_fault(0, None)
        b.set_power_limit(uuid(b), 180.0)
        assert b.read().gpus[0].power_limit_w == 180.0

    def test_unknown_fault(self) -> None:
        """An unknown fault name is a ValueError listing the known ones."""
        b, _ = backend()
        with pytest.raises(ValueError, match="temperature_unsupported"):
            b.inject_fault(0, "on_fire")

    def test_scenario_event(self) -> None:
        """A scenario event loses GPU 1 at t = 120 s, not before."""
        b, clock = backend(scenario(events=(ScenarioEvent(120.0, 1, "lost"),)), gpu_count=2)
        clock.advance(119.0)
        assert b.read().gpus[1].health is GpuHealth.OK
        clock.advance(1.0)
        assert b.read().gpus[1].health is GpuHealth.LOST
        assert b.read().gpus[0].health is GpuHealth.OK

    def test_scenario_needing_more_gpus(self) -> None:
        """A scenario naming GPU 1 with gpu_count 1 is a ConfigError saying how many GPUs it needs."""
        with pytest.raises(ConfigError, match="gpu_count = 2"):
            backend(scenario(events=(ScenarioEvent(1.0, 1, "lost"),)), gpu_count=1)


class TestProcesses:
    def test_attach_reports_a_real_pid(self) -> None:
        """attach_process makes the GPU report that PID with its VRAM and name, counted in memory used."""
        b, clock = backend(gpu_count=2)
        pid = os.getpid()
        b.attach_process(1, pid, 3 * GIB, name="pytest")
        clock.advance(1.0)
        gpu = b.read().gpus[1]
        assert gpu.processes is not None
        assert [(p.pid, p.used_memory_bytes, p.name) for p in gpu.processes] == [(pid, 3 * GIB, "pytest")]
        assert gpu.memory_used_bytes == RTX.memory_reserved_bytes + 3 * GIB
        assert b.read().gpus[0].processes == ()

    def test_resize_and_detach(self) -> None:
        """set_process_memory resizes, detach_process removes; unknown PIDs raise KeyError."""
        b, _ = backend()
        b.attach_process(0, 4242, GIB)
        b.set_process_memory(4242, 2 * GIB)
        procs = b.read().gpus[0].processes
        assert procs is not None and procs[0].used_memory_bytes == 2 * GIB
        b.detach_process(4242)
        assert b.read().gpus[0].processes == ()
        with pytest.raises(KeyError):
            b.detach_process(4242)
        with pytest.raises(KeyError):
            b.set_process_memory(4242, 1)

    def test_scenario_processes_get_synthetic_pids(self) -> None:
        """Scenario processes get PIDs from 2**22 up (never a real PID), one per GPU when no GPU is named."""
        procs = (ScenarioProcess("server", None, 0.0, None, GIB), ScenarioProcess("only0", 0, 0.0, None, GIB))
        b, _ = backend(scenario(processes=procs), gpu_count=2)
        snap = b.read()
        pids0 = [(p.pid, p.name) for p in snap.gpus[0].processes or ()]
        pids1 = [(p.pid, p.name) for p in snap.gpus[1].processes or ()]
        assert pids0 == [(SYNTHETIC_PID_BASE, "server"), (SYNTHETIC_PID_BASE + 2, "only0")]
        assert pids1 == [(SYNTHETIC_PID_BASE + 1, "server")]
        assert SYNTHETIC_PID_BASE == 2**22

    def test_start_end_and_detach_of_scenario_processes(self) -> None:
        """A scenario process appears at its start, leaves at its end, and detach ends it early."""
        procs = (ScenarioProcess("a", 0, 10.0, 20.0, GIB), ScenarioProcess("b", 0, 0.0, None, GIB))
        b, clock = backend(scenario(processes=procs))

        def names() -> list[str | None]:
            return [p.name for p in b.read().gpus[0].processes or ()]

        assert names() == ["b"]
        clock.advance_to(10.0)
        assert names() == ["a", "b"]
        clock.advance_to(20.0)
        assert names() == ["b"]
        b.detach_process(SYNTHETIC_PID_BASE + 1)
        assert names() == []

    def test_unchanged_processes_are_not_rebuilt(self) -> None:
        """With 256 steady processes, two reads return the very same tuple: no per-tick rebuild."""
        b, clock = backend()
        for i in range(256):
            b.attach_process(0, 10_000 + i, (i + 1) * 2**20)
        clock.advance(1.0)
        first = b.read().gpus[0].processes
        clock.advance(1.0)
        assert b.read().gpus[0].processes is first
        assert first is not None and len(first) == 256


class TestStats:
    def test_energy_is_power_integrated(self) -> None:
        """100 s at a steady 150 W is 15 kJ."""
        b, clock = backend(scenario(150.0))
        clock.advance(100.0)
        stats = b.stats(0)
        assert stats.energy_j == pytest.approx(15_000.0)
        assert b.read().gpus[0].energy_j == pytest.approx(15_000.0)
        assert (stats.elapsed_s, stats.active_s) == (100.0, 100.0)

    def test_work_depends_on_the_kind_of_workload(self) -> None:
        """Capped from 200 W to 160 W, compute slows to 0.8**0.55 of full speed and decoding to 0.8**0.15."""
        work = {}
        for kind in ("compute", "memory"):
            b, clock = backend(scenario(200.0, kind))
            b.set_power_limit(uuid(b), 160.0)
            clock.advance(1000.0)
            work[kind] = b.stats(0).work_s
        assert work["compute"] == pytest.approx(1000.0 * 0.8**0.55)
        assert work["memory"] == pytest.approx(1000.0 * 0.8**0.15)

    def test_uncapped_work_is_elapsed_time(self) -> None:
        """Uncapped, one second of work is done per second of activity; an idle GPU does none."""
        busy, clock = backend(scenario(150.0))
        idle, clock_idle = backend(scenario(0.0))
        clock.advance(50.0)
        clock_idle.advance(50.0)
        assert busy.stats(0).work_s == pytest.approx(50.0)
        assert idle.stats(0).work_s == 0.0


class TestFactory:
    def test_builds_from_config_names(self) -> None:
        """build_simulated_backend resolves shipped names, gpu_count and seed from SimulationConfig."""
        b = build_simulated_backend(
            SimulationConfig(profile="h100-80gb", gpu_count=2, scenario="gpu-lost"), VirtualClock()
        )
        assert [g.name for g in b.gpus()] == ["NVIDIA H100 80GB HBM3"] * 2
        assert b.scenario.name == "gpu-lost"

    def test_builds_from_paths(self, tmp_path: Path) -> None:
        """Profile and scenario may be paths to TOML files."""
        from governor.sim import render_profile

        profile_path = tmp_path / "p.toml"
        profile_path.write_text(render_profile(RTX).replace('name = "rtx4070"', 'name = "custom"'))
        scenario_path = tmp_path / "s.toml"
        scenario_path.write_text('name = "s"\n[[phase]]\nduration_s = 5\ndemand_w = 50\n')
        b = build_simulated_backend(
            SimulationConfig(profile=str(profile_path), scenario=str(scenario_path)), VirtualClock()
        )
        assert b.gpus()[0].uuid == "GPU-sim-custom-0"

    def test_gpu_lost_needs_two_gpus(self) -> None:
        """The gpu-lost scenario with one GPU is a SimDataError, not a silently ignored event."""
        with pytest.raises(SimDataError):
            build_simulated_backend(SimulationConfig(scenario="gpu-lost", gpu_count=1), VirtualClock())

    def test_state_file_from_config(self, tmp_path: Path) -> None:
        """SimulationConfig.state_file is used as the hardware state file."""
        path = tmp_path / "state.json"
        b = build_simulated_backend(SimulationConfig(state_file=str(path)), VirtualClock())
        b.set_power_limit(uuid(b), 180.0)
        assert path.exists()
