"""NvmlBackend against a fake pynvml: units, NotSupported, lost GPUs, version fallbacks, faults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor.backends import (
    Backend,
    BackendFatal,
    BackendUnavailable,
    GpuLostError,
    SetLimitFailed,
    SetLimitRefused,
)
from governor.backends.nvml import NO_DRIVER_MESSAGE, VERSION_MISMATCH_MESSAGE, NvmlBackend
from governor.clock import VirtualClock
from governor.model import GpuHealth, GpuReading
from tests.fake_pynvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNKNOWN,
    FakeGpu,
    FakeNvml,
    NVMLError,
)

UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"
UUID2 = "GPU-22222222-2222-2222-2222-222222222222"


def make(
    *gpus: FakeGpu, clock: VirtualClock | None = None, **kwargs: Any
) -> tuple[NvmlBackend, FakeNvml, VirtualClock]:
    """A backend over a fake NVML with the given GPUs (one default GPU when none)."""
    fake_kwargs = {k: kwargs.pop(k) for k in ("absent_symbols", "missing", "init_error") if k in kwargs}
    fake = FakeNvml(gpus or [FakeGpu(uuid=UUID0)], **fake_kwargs)
    clock = clock or VirtualClock()
    return NvmlBackend(clock, nvml=fake, **kwargs), fake, clock


def gpu(snapshot_gpus: tuple[GpuReading, ...], index: int) -> GpuReading:
    return next(r for r in snapshot_gpus if r.index == index)


class TestInit:
    def test_driver_not_loaded_is_unavailable(self) -> None:
        """nvmlInit failing with DriverNotLoaded raises BackendUnavailable naming the fix and the reason."""
        with pytest.raises(BackendUnavailable) as info:
            make(init_error=NVML_ERROR_DRIVER_NOT_LOADED)
        assert NO_DRIVER_MESSAGE in str(info.value)
        assert "Driver Not Loaded" in str(info.value)

    def test_library_not_found_is_unavailable(self) -> None:
        """nvmlInit failing with LibraryNotFound raises BackendUnavailable with the NVML reason."""
        with pytest.raises(BackendUnavailable, match=r"try --simulate.*Library Not Found"):
            make(init_error=NVML_ERROR_LIBRARY_NOT_FOUND)

    def test_version_mismatch_at_init_is_fatal(self) -> None:
        """A library/driver mismatch at nvmlInit raises BackendFatal with the restart message."""
        with pytest.raises(BackendFatal, match="restart needed"):
            make(init_error=NVML_ERROR_LIB_RM_VERSION_MISMATCH)

    def test_no_gpu_is_unavailable_and_shuts_down(self) -> None:
        """A driver with no GPU raises BackendUnavailable and still calls nvmlShutdown."""
        fake = FakeNvml([])
        with pytest.raises(BackendUnavailable, match="no NVIDIA GPU"):
            NvmlBackend(VirtualClock(), nvml=fake)
        assert fake.shutdowns == 1

    def test_static_facts_in_watts_and_celsius(self) -> None:
        """Static facts are read once and converted: mW -> W, bytes kept, PCI id decoded."""
        backend, fake, _ = make(FakeGpu(uuid=UUID0, limit_min_mw=200_000, limit_max_mw=700_000))
        (info,) = backend.gpus()
        assert info.uuid == UUID0
        assert info.name == "NVIDIA H100 80GB HBM3"
        assert info.pci_bus_id == "00000000:19:00.0"
        assert (info.power_limit_min_w, info.power_limit_max_w, info.power_limit_default_w) == (
            200.0,
            700.0,
            700.0,
        )
        assert (info.temperature_slowdown_c, info.temperature_shutdown_c) == (89.0, 95.0)
        assert info.memory_total_bytes == 85_520_809_984
        assert info.driver_version == "580.159.04"
        backend.read()
        assert fake.calls["nvmlDeviceGetPowerManagementLimitConstraints"] == 1

    def test_static_not_supported_is_none(self) -> None:
        """A static fact NVML cannot give is None (not 0)."""
        backend, _, _ = make(
            FakeGpu(uuid=UUID0, errors={"nvmlDeviceGetPowerManagementLimitConstraints": NVML_ERROR_NOT_SUPPORTED})
        )
        (info,) = backend.gpus()
        assert info.power_limit_min_w is None
        assert info.power_limit_max_w is None

    def test_close_is_idempotent(self) -> None:
        """close() shuts NVML down exactly once, and read() afterwards raises BackendFatal."""
        backend, fake, _ = make()
        backend.close()
        backend.close()
        assert fake.shutdowns == 1
        with pytest.raises(BackendFatal):
            backend.read()

    def test_is_a_backend(self) -> None:
        """NvmlBackend satisfies the Backend protocol and is named 'nvml'."""
        backend, _, _ = make()
        assert isinstance(backend, Backend)
        assert backend.name == "nvml"


class TestRead:
    def test_units_are_converted(self) -> None:
        """Power mW -> W, energy mJ -> J, utilisation % -> ratio, memory v2 bytes as they are."""
        backend, _, clock = make(
            FakeGpu(
                uuid=UUID0,
                temperature_c=72,
                power_mw=699_512,
                enforced_limit_mw=650_000,
                requested_limit_mw=600_000,
                memory_used=6_442_450_944,
                utilization_pct=100,
                clock_event_reasons=0x4,
                sm_clock_mhz=1980,
                energy_mj=123_456_789,
            )
        )
        clock.advance(5.0)
        snap = backend.read()
        (r,) = snap.gpus
        assert snap.t_s == 5.0
        assert snap.wall_time_s == clock.wall()
        assert r.health is GpuHealth.OK
        assert r.error is None
        assert r.temperature_c == 72.0
        assert r.power_w == pytest.approx(699.512)
        assert r.power_limit_w == 650.0
        assert r.power_limit_requested_w == 600.0
        assert r.energy_j == pytest.approx(123_456.789)
        assert r.memory_used_bytes == 6_442_450_944
        assert r.memory_total_bytes == 85_520_809_984
        assert r.utilization_gpu_ratio == 1.0
        assert r.clock_event_reasons == 0x4
        assert r.sm_clock_mhz == 1980.0
        assert r.processes == ()

    def test_processes_merged_by_pid(self, tmp_path: Path) -> None:
        """Compute and graphics processes merge by pid; None memory stays None; names come from comm."""
        (tmp_path / "100").mkdir()
        (tmp_path / "100" / "comm").write_text("python3\n")
        backend, _, _ = make(
            FakeGpu(uuid=UUID0, compute=[(100, 2 << 30), (200, None)], graphics=[(100, 2 << 30), (300, 1 << 20)]),
            proc_root=tmp_path,
        )
        (r,) = backend.read().gpus
        assert r.processes is not None
        by_pid = {p.pid: p for p in r.processes}
        assert sorted(by_pid) == [100, 200, 300]
        assert by_pid[100].used_memory_bytes == 2 << 30
        assert by_pid[100].name == "python3"
        assert by_pid[200].used_memory_bytes is None
        assert by_pid[200].name is None  # no /proc entry
        assert by_pid[300].used_memory_bytes == 1 << 20

    def test_process_name_cached_while_present(self, tmp_path: Path) -> None:
        """A pid's name is read once while it stays on the GPU and read again after it left."""
        (tmp_path / "100").mkdir()
        comm = tmp_path / "100" / "comm"
        comm.write_text("first\n")
        fake_gpu = FakeGpu(uuid=UUID0, compute=[(100, 1)])
        backend, _, _ = make(fake_gpu, proc_root=tmp_path)
        backend.read()
        comm.write_text("second\n")
        (r,) = backend.read().gpus
        assert r.processes is not None and r.processes[0].name == "first"
        fake_gpu.compute = []
        backend.read()
        fake_gpu.compute = [(100, 1)]
        (r,) = backend.read().gpus
        assert r.processes is not None and r.processes[0].name == "second"

    def test_v2_memory_preferred(self) -> None:
        """Memory used comes from the v2 call, which excludes reserved memory."""
        backend, fake, _ = make(FakeGpu(uuid=UUID0, memory_used=1000, memory_reserved=500))
        (r,) = backend.read().gpus
        assert r.memory_used_bytes == 1000
        assert fake.calls["nvmlDeviceGetMemoryInfo"] == 0

    def test_transient_error_is_none_for_the_tick(self) -> None:
        """A timeout on one field gives None for that tick and the field is read again next tick."""
        fake_gpu = FakeGpu(uuid=UUID0, errors={"nvmlDeviceGetPowerUsage": NVML_ERROR_TIMEOUT})
        backend, _, clock = make(fake_gpu)
        (r,) = backend.read().gpus
        assert r.power_w is None
        assert r.health is GpuHealth.OK
        del fake_gpu.errors["nvmlDeviceGetPowerUsage"]
        clock.advance(1)
        (r,) = backend.read().gpus
        assert r.power_w == pytest.approx(85.097)


class TestNotSupported:
    def test_fields_are_none_and_logged_once(self) -> None:
        """NotSupported fields read as None (never 0), logged once per GPU and field, not asked again."""
        unsupported = {
            "nvmlDeviceGetPowerUsage": NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetUtilizationRates": NVML_ERROR_NOT_SUPPORTED,
        }
        with capture_logs() as logs:
            backend, fake, clock = make(
                FakeGpu(uuid=UUID0, errors=dict(unsupported)), FakeGpu(uuid=UUID1, errors=dict(unsupported))
            )
            for _ in range(5):
                snap = backend.read()
                clock.advance(1)
        for r in snap.gpus:
            assert r.power_w is None
            assert r.utilization_gpu_ratio is None
            assert r.health is GpuHealth.OK
        events = [(e["gpu"], e["field"]) for e in logs if e["event"] == "nvml_field_not_supported"]
        assert sorted(events) == [(0, "power"), (0, "utilization"), (1, "power"), (1, "utilization")]
        assert fake.calls["nvmlDeviceGetPowerUsage"] == 2  # once per GPU
        assert fake.calls["nvmlDeviceGetTemperatureV"] == 10

    def test_reprobed_rarely(self) -> None:
        """A NotSupported field is asked again after the reprobe interval and used when it answers."""
        fake_gpu = FakeGpu(uuid=UUID0, errors={"nvmlDeviceGetPowerUsage": NVML_ERROR_NOT_SUPPORTED})
        backend, fake, clock = make(fake_gpu, unsupported_reprobe_s=60.0)
        backend.read()
        clock.advance(59)
        backend.read()
        assert fake.calls["nvmlDeviceGetPowerUsage"] == 1
        clock.advance(1)
        with capture_logs() as logs:
            backend.read()  # asked again, still unsupported: not logged again
        assert fake.calls["nvmlDeviceGetPowerUsage"] == 2
        assert logs == []
        del fake_gpu.errors["nvmlDeviceGetPowerUsage"]
        clock.advance(60)
        (r,) = backend.read().gpus
        assert r.power_w == pytest.approx(85.097)

    def test_field_failing_later_is_found(self) -> None:
        """A field that turns NotSupported after many clean ticks is still found, None and logged."""
        fake_gpu = FakeGpu(uuid=UUID0)
        backend, _, clock = make(fake_gpu, FakeGpu(uuid=UUID1))
        for _ in range(3):
            backend.read()
            clock.advance(1)
        fake_gpu.errors["nvmlDeviceGetUtilizationRates"] = NVML_ERROR_NOT_SUPPORTED
        with capture_logs() as logs:
            snap = backend.read()
        assert gpu(snap.gpus, 0).utilization_gpu_ratio is None
        assert gpu(snap.gpus, 0).power_w == pytest.approx(85.097)
        assert gpu(snap.gpus, 1).utilization_gpu_ratio == 0.0
        assert [(e["event"], e["gpu"], e["field"]) for e in logs] == [("nvml_field_not_supported", 0, "utilization")]

    def test_missing_temperature_degrades(self) -> None:
        """A GPU whose temperature is NotSupported is DEGRADED with temperature None."""
        backend, _, _ = make(
            FakeGpu(
                uuid=UUID0,
                errors={
                    "nvmlDeviceGetTemperatureV": NVML_ERROR_NOT_SUPPORTED,
                },
            )
        )
        (r,) = backend.read().gpus
        assert r.temperature_c is None
        assert r.health is GpuHealth.DEGRADED
        assert r.error is not None and "temperature" in r.error

    def test_no_process_queries_gives_none(self) -> None:
        """When neither process query is supported, processes is None (unknown), not empty."""
        backend, _, _ = make(
            FakeGpu(
                uuid=UUID0,
                errors={
                    "nvmlDeviceGetComputeRunningProcesses_v3": NVML_ERROR_NOT_SUPPORTED,
                    "nvmlDeviceGetGraphicsRunningProcesses_v3": NVML_ERROR_NOT_SUPPORTED,
                },
            )
        )
        (r,) = backend.read().gpus
        assert r.processes is None


class TestLostGpu:
    def test_lost_gpu_among_healthy_ones(self) -> None:
        """A lost GPU reads as LOST with a reason while the others read normally."""
        backend, fake, _ = make(FakeGpu(uuid=UUID0), FakeGpu(uuid=UUID1), FakeGpu(uuid=UUID2))
        fake.gpus[1].lost = True
        snap = backend.read()
        assert [r.health for r in snap.gpus] == [GpuHealth.OK, GpuHealth.LOST, GpuHealth.OK]
        lost = gpu(snap.gpus, 1)
        assert lost.uuid == UUID1
        assert lost.error is not None and "GPU is lost" in lost.error
        assert lost.temperature_c is None
        assert gpu(snap.gpus, 0).temperature_c == 40.0
        assert gpu(snap.gpus, 2).temperature_c == 40.0

    def test_reacquire_with_backoff(self) -> None:
        """A lost GPU's handle is reacquired by UUID after 1 s, 2 s, 4 s ... and the GPU comes back."""
        lost_gpu = FakeGpu(uuid=UUID1)
        backend, fake, clock = make(FakeGpu(uuid=UUID0), lost_gpu)
        backend.read()
        lost_gpu.lost = True
        with capture_logs() as logs:
            assert gpu(backend.read().gpus, 1).health is GpuHealth.LOST  # t=0: lost, retry at 1
            clock.advance(0.5)
            assert gpu(backend.read().gpus, 1).health is GpuHealth.LOST
            assert fake.calls["nvmlDeviceGetHandleByUUID"] == 0  # too early to retry
            clock.advance(0.5)
            assert gpu(backend.read().gpus, 1).health is GpuHealth.LOST  # t=1: retry fails, next at 3
            assert fake.calls["nvmlDeviceGetHandleByUUID"] == 1
            clock.advance(1.9)
            backend.read()
            assert fake.calls["nvmlDeviceGetHandleByUUID"] == 1
            clock.advance(0.1)
            backend.read()  # t=3: retry fails, next at 7
            assert fake.calls["nvmlDeviceGetHandleByUUID"] == 2
            lost_gpu.lost = False
            clock.advance(3.9)
            assert gpu(backend.read().gpus, 1).health is GpuHealth.LOST
            clock.advance(0.1)
            snap = backend.read()  # t=7: reacquired
        assert fake.calls["nvmlDeviceGetHandleByUUID"] == 3
        back = gpu(snap.gpus, 1)
        assert back.health is GpuHealth.OK
        assert back.temperature_c == 40.0
        assert back.power_limit_requested_w == 700.0  # slow reads refreshed after recovery
        assert gpu(snap.gpus, 0).health is GpuHealth.OK
        assert [e["event"] for e in logs] == ["nvml_gpu_lost", "nvml_gpu_recovered"]

    def test_backoff_is_capped(self) -> None:
        """The reacquire backoff doubles up to its maximum and stays there."""
        lost_gpu = FakeGpu(uuid=UUID0)
        backend, fake, clock = make(lost_gpu, lost_backoff_initial_s=1.0, lost_backoff_max_s=4.0)
        lost_gpu.lost = True
        backend.read()  # lost at t=0; tries at 1, 3, 7, 11, 15
        for tenth in range(1, 151):
            clock.advance_to(tenth / 10)
            backend.read()
        assert fake.calls["nvmlDeviceGetHandleByUUID"] == 5

    def test_gpu_lost_at_open_is_skipped(self) -> None:
        """A GPU that cannot even give its handle at open is left out with a warning; the others work."""
        with capture_logs() as logs:
            backend, _, _ = make(FakeGpu(uuid=UUID0), FakeGpu(uuid=UUID1, lost=True))
        assert [i.uuid for i in backend.gpus()] == [UUID0]
        assert [r.health for r in backend.read().gpus] == [GpuHealth.OK]
        assert [(e["event"], e["gpu"]) for e in logs] == [("nvml_gpu_skipped", 1)]

    def test_unknown_error_counts_as_lost(self) -> None:
        """An UNKNOWN error on a GPU marks it LOST rather than crashing the read."""
        backend, _, _ = make(FakeGpu(uuid=UUID0, errors={"nvmlDeviceGetPowerUsage": NVML_ERROR_UNKNOWN}))
        (r,) = backend.read().gpus
        assert r.health is GpuHealth.LOST

    def test_set_limit_on_lost_gpu(self) -> None:
        """Setting a limit on a GPU known to be lost raises GpuLostError without calling NVML."""
        lost_gpu = FakeGpu(uuid=UUID0)
        backend, fake, _ = make(lost_gpu)
        lost_gpu.lost = True
        backend.read()
        with pytest.raises(GpuLostError):
            backend.set_power_limit(UUID0, 500.0)
        assert fake.calls["nvmlDeviceSetPowerManagementLimit"] == 0


class TestStaticFactsReadAgain:
    """A power-limit range missing at start is read again (with every range read, each 10 s), so the GPU is
    governed once it has one; a GPU lost at start gets all its facts once it answers."""

    CONSTRAINTS = "nvmlDeviceGetPowerManagementLimitConstraints"

    def test_a_range_read_that_failed_at_start_is_read_again(self) -> None:
        """A transient failure (TIMEOUT) of the range read at start leaves no range; 10 s later it is read again."""
        card = FakeGpu(uuid=UUID0, errors={self.CONSTRAINTS: NVML_ERROR_TIMEOUT})
        backend, fake, clock = make(card)
        assert backend.gpus()[0].power_limit_min_w is None
        del card.errors[self.CONSTRAINTS]
        with capture_logs() as logs:
            for _ in range(9):
                clock.advance(1.0)
                backend.read()
            assert fake.calls[self.CONSTRAINTS] == 1  # asked at start only, so far
            assert backend.gpus()[0].power_limit_max_w is None
            clock.advance(1.0)
            backend.read()
            clock.advance(1.0)
            backend.read()
        (info,) = backend.gpus()
        assert (info.power_limit_min_w, info.power_limit_max_w, info.power_limit_default_w) == (200.0, 700.0, 700.0)
        assert fake.calls[self.CONSTRAINTS] == 2  # next asked at 20 s, with every range read
        changes = [e for e in logs if e["event"] == "nvml_power_range_changed"]
        assert [(e["old_max_w"], e["max_w"]) for e in changes] == [(None, 700.0)]

    def test_a_range_that_keeps_failing_is_asked_every_10_s_and_logged_once(self) -> None:
        """While the range read keeps failing it is asked once per 10 s, with one warning in all."""
        card = FakeGpu(uuid=UUID0, errors={self.CONSTRAINTS: NVML_ERROR_TIMEOUT})
        with capture_logs() as logs:
            backend, fake, clock = make(card)
            for _ in range(95):
                clock.advance(1.0)
                backend.read()
        assert fake.calls[self.CONSTRAINTS] == 10  # at 0, 10, ... 90 s
        assert [e["event"] for e in logs].count("nvml_field_failed") == 1
        assert backend.gpus()[0].power_limit_min_w is None

    def test_a_not_supported_range_rests_like_any_not_supported_field(self) -> None:
        """A card without power management (NotSupported) is asked again only after unsupported_reprobe_s."""
        card = FakeGpu(uuid=UUID0, errors={self.CONSTRAINTS: NVML_ERROR_NOT_SUPPORTED})
        backend, fake, clock = make(card, unsupported_reprobe_s=120.0)
        for _ in range(119):
            clock.advance(1.0)
            backend.read()
        assert fake.calls[self.CONSTRAINTS] == 1
        del card.errors[self.CONSTRAINTS]
        clock.advance(1.0)
        backend.read()
        assert fake.calls[self.CONSTRAINTS] == 2
        assert backend.gpus()[0].power_limit_max_w == 700.0

    def test_a_gpu_lost_at_start_gets_its_facts_once_it_answers(self) -> None:
        """A GPU lost while its facts were read at start (UNKNOWN) gets its name and range when it is back."""
        card = FakeGpu(uuid=UUID0, errors={"nvmlDeviceGetName": NVML_ERROR_UNKNOWN})
        backend, _, clock = make(card)
        assert backend.gpus()[0].name == "unknown GPU"
        assert backend.read().gpus[0].health is GpuHealth.LOST
        del card.errors["nvmlDeviceGetName"]
        clock.advance(1.0)
        snap = backend.read()  # reacquired, then its facts
        assert snap.gpus[0].health is GpuHealth.OK
        (info,) = backend.gpus()
        assert (info.name, info.power_limit_min_w, info.power_limit_max_w) == ("NVIDIA H100 80GB HBM3", 200.0, 700.0)
        assert info.memory_total_bytes == card.memory_total

    def test_complete_facts_are_never_read_again(self) -> None:
        """A GPU whose facts hold its range has them read once, its range every 10 s, and keeps the same GpuInfo
        object while the range does not change."""
        backend, fake, clock = make(FakeGpu(uuid=UUID0))
        before = backend.gpus()
        for _ in range(100):
            clock.advance(1.0)
            backend.read()
        assert backend.gpus() is before
        assert fake.calls[self.CONSTRAINTS] == 11  # at 0, 10, ... 100 s
        assert fake.calls["nvmlDeviceGetName"] == 1


class TestVersionFallbacks:
    def test_temperature_v_missing_in_module(self) -> None:
        """Without nvmlDeviceGetTemperatureV in nvidia-ml-py, the old nvmlDeviceGetTemperature is used."""
        backend, fake, _ = make(missing={"nvmlDeviceGetTemperatureV"})
        for _ in range(3):
            (r,) = backend.read().gpus
        assert r.temperature_c == 40.0
        assert fake.calls["nvmlDeviceGetTemperature"] == 3

    def test_temperature_v_missing_in_driver(self) -> None:
        """A driver without the TemperatureV symbol is probed once, then the old call is used."""
        backend, fake, _ = make(FakeGpu(uuid=UUID0), FakeGpu(uuid=UUID1), absent_symbols={"nvmlDeviceGetTemperatureV"})
        for _ in range(3):
            snap = backend.read()
        assert [r.temperature_c for r in snap.gpus] == [40.0, 40.0]
        assert fake.calls["nvmlDeviceGetTemperatureV"] == 1
        assert fake.calls["nvmlDeviceGetTemperature"] == 6

    def test_memory_v2_missing(self) -> None:
        """A driver without memory info v2 falls back to v1, probed once."""
        backend, fake, _ = make(absent_symbols={"nvmlDeviceGetMemoryInfo_v2"})
        for _ in range(3):
            (r,) = backend.read().gpus
        assert r.memory_used_bytes == 503_316_480
        assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 1
        assert fake.calls["nvmlDeviceGetMemoryInfo"] == 4  # static read at open + 3 ticks

    def test_memory_v2_missing_in_module(self) -> None:
        """An nvidia-ml-py without nvmlMemory_v2 uses the v1 call directly."""
        backend, fake, _ = make(missing={"nvmlMemory_v2"})
        backend.read()
        assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 0
        assert fake.calls["nvmlDeviceGetMemoryInfo"] == 2

    def test_process_v3_then_v2_then_v1(self) -> None:
        """Process queries fall back v3 -> v2 -> v1; each missing version is probed once in all."""
        absent = {
            "nvmlDeviceGetComputeRunningProcesses_v3",
            "nvmlDeviceGetComputeRunningProcesses_v2",
            "nvmlDeviceGetGraphicsRunningProcesses_v3",
        }
        backend, fake, _ = make(
            FakeGpu(uuid=UUID0, compute=[(10, 100)]),
            FakeGpu(uuid=UUID1, graphics=[(20, 200)]),
            absent_symbols=absent,
        )
        for _ in range(4):
            snap = backend.read()
        assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 1
        assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 1
        assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 8
        assert fake.calls["nvmlDeviceGetGraphicsRunningProcesses_v3"] == 1
        assert fake.calls["nvmlDeviceGetGraphicsRunningProcesses_v2"] == 8
        assert fake.calls["nvmlDeviceGetGraphicsRunningProcesses"] == 0
        assert [[p.pid for p in r.processes or ()] for r in snap.gpus] == [[10], [20]]

    def test_process_v3_missing_in_module(self) -> None:
        """An nvidia-ml-py without the _v3 functions starts at _v2."""
        backend, fake, _ = make(
            missing={"nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v3"}
        )
        backend.read()
        assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 1
        assert fake.calls["nvmlDeviceGetGraphicsRunningProcesses_v2"] == 1

    def test_event_reasons_fall_back_to_throttle_reasons(self) -> None:
        """Without ClocksEventReasons, the older ClocksThrottleReasons gives the bitmask."""
        backend, fake, _ = make(missing={"nvmlDeviceGetCurrentClocksEventReasons"})
        (r,) = backend.read().gpus
        assert r.clock_event_reasons == 1
        assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 1

    def test_no_version_at_all_is_not_supported(self) -> None:
        """When no version of a read exists, the field is None and logged as not supported."""
        with capture_logs() as logs:
            backend, _, _ = make(
                missing={
                    "nvmlDeviceGetCurrentClocksEventReasons",
                    "nvmlDeviceGetCurrentClocksThrottleReasons",
                }
            )
            (r,) = backend.read().gpus
        assert r.clock_event_reasons is None
        assert any(e["event"] == "nvml_field_not_supported" and e["field"] == "clock_event_reasons" for e in logs)


class TestSetPowerLimit:
    def test_watts_to_milliwatts(self) -> None:
        """set_power_limit sends milliwatts and the next read shows the requested limit in watts."""
        fake_gpu = FakeGpu(uuid=UUID0)
        backend, _, clock = make(fake_gpu)
        backend.read()
        backend.set_power_limit(UUID0, 512.5)
        assert fake_gpu.requested_limit_mw == 512_500
        clock.advance(1)
        (r,) = backend.read().gpus
        assert r.power_limit_requested_w == 512.5  # re-read at once, not after 30 s
        assert r.power_limit_w == 512.5

    def test_out_of_range_fails_without_calling(self) -> None:
        """A limit outside the constraints raises SetLimitFailed and never reaches NVML."""
        backend, fake, _ = make()
        with pytest.raises(SetLimitFailed, match="outside"):
            backend.set_power_limit(UUID0, 180.0)
        with pytest.raises(SetLimitFailed):
            backend.set_power_limit(UUID0, float("nan"))
        assert fake.calls["nvmlDeviceSetPowerManagementLimit"] == 0

    @pytest.mark.parametrize("code", [NVML_ERROR_NO_PERMISSION, NVML_ERROR_NOT_SUPPORTED])
    def test_refused(self, code: int) -> None:
        """NO_PERMISSION and NOT_SUPPORTED raise SetLimitRefused carrying NVML's reason."""
        backend, _, _ = make(FakeGpu(uuid=UUID0, errors={"nvmlDeviceSetPowerManagementLimit": code}))
        with pytest.raises(SetLimitRefused, match=str(NVMLError(code))):
            backend.set_power_limit(UUID0, 500.0)

    def test_gpu_lost_while_setting(self) -> None:
        """GPU_IS_LOST while setting raises GpuLostError and the next read shows the GPU LOST."""
        backend, _, _ = make(FakeGpu(uuid=UUID0, errors={"nvmlDeviceSetPowerManagementLimit": NVML_ERROR_GPU_IS_LOST}))
        with pytest.raises(GpuLostError):
            backend.set_power_limit(UUID0, 500.0)
        (r,) = backend.read().gpus
        assert r.health is GpuHealth.LOST

    def test_other_errors_fail(self) -> None:
        """Any other NVML error while setting raises SetLimitFailed."""
        backend, _, _ = make(
            FakeGpu(uuid=UUID0, errors={"nvmlDeviceSetPowerManagementLimit": NVML_ERROR_INVALID_ARGUMENT})
        )
        with pytest.raises(SetLimitFailed, match="Invalid Argument"):
            backend.set_power_limit(UUID0, 500.0)

    def test_unknown_uuid_fails(self) -> None:
        """A UUID the backend does not know raises SetLimitFailed."""
        backend, _, _ = make()
        with pytest.raises(SetLimitFailed, match="no GPU"):
            backend.set_power_limit("GPU-nope", 500.0)


class TestFatal:
    def test_mismatch_during_read(self) -> None:
        """LibRmVersionMismatch during a read raises BackendFatal with the restart message."""
        backend, fake, _ = make()
        fake.fatal = NVML_ERROR_LIB_RM_VERSION_MISMATCH
        with pytest.raises(BackendFatal, match="restart needed") as info:
            backend.read()
        assert VERSION_MISMATCH_MESSAGE in str(info.value)

    def test_mismatch_during_set(self) -> None:
        """LibRmVersionMismatch while setting a limit raises BackendFatal."""
        backend, _, _ = make(
            FakeGpu(uuid=UUID0, errors={"nvmlDeviceSetPowerManagementLimit": NVML_ERROR_LIB_RM_VERSION_MISMATCH})
        )
        with pytest.raises(BackendFatal):
            backend.set_power_limit(UUID0, 500.0)

    def test_mismatch_during_reacquire(self) -> None:
        """LibRmVersionMismatch while reacquiring a lost GPU raises BackendFatal."""
        lost_gpu = FakeGpu(uuid=UUID0)
        backend, fake, clock = make(lost_gpu)
        lost_gpu.lost = True
        backend.read()
        fake.fatal = NVML_ERROR_LIB_RM_VERSION_MISMATCH
        clock.advance(1)
        with pytest.raises(BackendFatal):
            backend.read()

    def test_function_not_found_on_plain_read_is_not_fatal(self) -> None:
        """A missing symbol for a single-version read only makes that field None."""
        backend, _, _ = make(absent_symbols={"nvmlDeviceGetClockInfo"})
        (r,) = backend.read().gpus
        assert r.sm_clock_mhz is None
        assert r.health is GpuHealth.OK
        assert NVML_ERROR_FUNCTION_NOT_FOUND == 13


class TestCadence:
    def test_slow_reads_on_their_own_cadence(self) -> None:
        """The requested limit is read every 30 s and energy every 60 s, carried forward in between."""
        fake_gpu = FakeGpu(uuid=UUID0, energy_mj=5_000)
        backend, fake, clock = make(fake_gpu)
        energies = []
        for _ in range(121):  # t = 0 .. 120 at 1 Hz
            (r,) = backend.read().gpus
            energies.append(r.energy_j)
            fake_gpu.energy_mj += 700_000  # 700 J per second
            clock.advance(1.0)
        assert fake.calls["nvmlDeviceGetPowerManagementLimit"] == 5  # t = 0, 30, 60, 90, 120
        assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 3  # t = 0, 60, 120
        assert fake.calls["nvmlDeviceGetPowerUsage"] == 121
        assert energies[0] == energies[59] == 5.0
        assert energies[60] == pytest.approx(5.0 + 60 * 700.0)
        assert None not in energies

    def test_cadence_is_configurable(self) -> None:
        """limit_refresh_s and energy_refresh_s set the slow cadences."""
        backend, fake, clock = make(limit_refresh_s=5.0, energy_refresh_s=2.0)
        for _ in range(10):
            backend.read()
            clock.advance(1.0)
        assert fake.calls["nvmlDeviceGetPowerManagementLimit"] == 2
        assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 5

    def test_invalid_cadence_rejected(self) -> None:
        """A non-positive cadence is a ValueError at construction."""
        with pytest.raises(ValueError, match="energy_refresh_s"):
            make(energy_refresh_s=0.0)
