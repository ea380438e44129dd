"""NvmlBackend and MIG against a fake pynvml: the mode, per-instance memory and processes, layouts that change, errors.

No GPU here runs in MIG mode (and MIG is never switched on the shared GPU machine): all of this is
validated against tests/fake_pynvml.py only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor.backends import BackendFatal
from governor.backends._nvml_probe import PER_TICK_FIELDS
from governor.backends.nvml import NvmlBackend
from governor.clock import VirtualClock
from governor.model import GpuHealth, GpuReading, ProcessReading
from tests.fake_pynvml import (
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_UNKNOWN,
    FakeGpu,
    FakeMig,
    FakeNvml,
)

GiB = 2**30
UUID = "GPU-00000000-0000-0000-0000-000000000000"
MIG_A = "MIG-aaaaaaaa-0000-0000-0000-000000000000"
MIG_B = "MIG-bbbbbbbb-0000-0000-0000-000000000000"
MIG_C = "MIG-cccccccc-0000-0000-0000-000000000000"
PER_TICK_CALLS = Counter(
    {
        "nvmlDeviceGetTemperatureV": 1,
        "nvmlDeviceGetPowerUsage": 1,
        "nvmlDeviceGetEnforcedPowerLimit": 1,
        "nvmlDeviceGetMemoryInfo_v2": 1,
        "nvmlDeviceGetUtilizationRates": 1,
        "nvmlDeviceGetCurrentClocksEventReasons": 1,
        "nvmlDeviceGetClockInfo": 1,
        "nvmlDeviceGetComputeRunningProcesses_v3": 1,
        "nvmlDeviceGetGraphicsRunningProcesses_v3": 1,
        "nvmlEventSetWait_v2": 1,
    }
)
"""The NVML calls of one tick of one GPU between the slow reads (bench/nvml_floor.py's floor and the XID wait)."""


def mig_gpu(*devices: FakeMig | None, **kwargs: Any) -> FakeGpu:
    """A GPU in MIG mode with these MIG devices (None: an empty index)."""
    return FakeGpu(uuid=UUID, mig_mode=1, mig_devices=list(devices), **kwargs)


def make(*gpus: FakeGpu, **fake_kwargs: Any) -> tuple[NvmlBackend, FakeNvml, VirtualClock]:
    fake = FakeNvml(gpus, **fake_kwargs)
    clock = VirtualClock()
    return NvmlBackend(clock, nvml=fake, proc_root="/nonexistent"), fake, clock


def tick(backend: NvmlBackend, clock: VirtualClock, seconds: float = 1.0) -> GpuReading:
    clock.advance(seconds)
    return backend.read().gpus[0]


def used(reading: GpuReading) -> dict[int, int | None]:
    assert reading.processes is not None
    return {p.pid: p.used_memory_bytes for p in reading.processes}


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


class TestMode:
    @pytest.mark.parametrize("mode", [0, None], ids=["mig-disabled", "no-mig"])
    def test_a_gpu_not_in_mig_mode_makes_the_same_per_tick_calls(self, mode: int | None) -> None:
        """A GPU with MIG disabled or without MIG makes, between the slow reads, exactly the floor's calls per tick
        (the per-tick set of bench/nvml_floor.py), and never a MIG device call."""
        assert len(PER_TICK_CALLS) == len(PER_TICK_FIELDS) + 1
        backend, fake, clock = make(FakeGpu(uuid=UUID, mig_mode=mode))
        tick(backend, clock)
        for _ in range(8):  # ticks 2-9: no slow read falls due
            before = Counter(fake.calls)
            reading = tick(backend, clock)
            assert Counter(fake.calls) - before == PER_TICK_CALLS
            assert reading.mig_instances is None
        assert not fake.mig_calls
        assert fake.calls["nvmlDeviceGetMaxMigDeviceCount"] == fake.calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 0

    def test_the_mode_is_read_at_start_and_every_10_s(self) -> None:
        """The MIG mode is read on the first tick and then only with the 10 s slow reads; disabled reads False."""
        backend, fake, clock = make(FakeGpu(uuid=UUID))
        assert tick(backend, clock).mig_enabled is False
        assert fake.calls["nvmlDeviceGetMigMode"] == 1
        for _ in range(29):
            tick(backend, clock)
        assert fake.calls["nvmlDeviceGetMigMode"] == 3  # at 1 s, 11 s and 21 s

    def test_not_supported_is_none_and_never_asked_again(self) -> None:
        """A GPU without MIG (NotSupported) has mig_enabled None, logged once, and is never asked again."""
        backend, fake, clock = make(FakeGpu(uuid=UUID, mig_mode=None))
        with capture_logs() as logs:
            readings = [tick(backend, clock, 10.0) for _ in range(5)]
        assert {r.mig_enabled for r in readings} == {None}
        assert fake.calls["nvmlDeviceGetMigMode"] == 1
        assert [e["field"] for e in events(logs, "nvml_field_not_supported")] == ["mig_mode"]

    def test_bindings_without_the_mode_call_read_none(self) -> None:
        """An nvidia-ml-py without nvmlDeviceGetMigMode reads the mode as unknown (None) and governs on."""
        backend, _, clock = make(FakeGpu(uuid=UUID, mig_mode=1), missing={"nvmlDeviceGetMigMode"})
        reading = tick(backend, clock)
        assert reading.mig_enabled is None and reading.mig_instances is None
        assert reading.health is GpuHealth.OK

    def test_a_failed_mode_read_keeps_the_mode_read_before(self) -> None:
        """A mode read that fails (no permission, for once) keeps the last mode: unknown is not "disabled"."""
        gpu = mig_gpu(FakeMig(uuid=MIG_A))
        backend, _, clock = make(gpu)
        assert tick(backend, clock).mig_enabled is True
        gpu.errors["nvmlDeviceGetMigMode"] = NVML_ERROR_NO_PERMISSION
        reading = tick(backend, clock, 10.0)
        assert reading.mig_enabled is True and reading.mig_instances is not None

    def test_mig_enabled_at_runtime_is_seen_at_the_next_slow_read(self) -> None:
        """A GPU switched to MIG mode (after its reset) reads per instance from the next slow read, logged once."""
        gpu = FakeGpu(uuid=UUID, mig_devices=[FakeMig(uuid=MIG_A, memory_used=GiB)])
        backend, _, clock = make(gpu)
        assert tick(backend, clock).mig_instances is None
        gpu.mig_mode = 1
        with capture_logs() as logs:
            assert tick(backend, clock).mig_instances is None  # not before the slow read
            reading = tick(backend, clock, 10.0)
        assert reading.mig_enabled is True
        assert reading.mig_instances is not None and [i.uuid for i in reading.mig_instances] == [MIG_A]
        (changed,) = events(logs, "nvml_mig_mode_changed")
        assert (changed["mode"], changed["was"]) == ("enabled", "disabled")

    def test_mig_disabled_at_runtime_drops_the_instances(self) -> None:
        """A GPU taken out of MIG mode reads as a whole GPU again from the next slow read, logged once."""
        gpu = mig_gpu(FakeMig(uuid=MIG_A, compute=[(11, GiB)]), compute=[(11, 5 * GiB)])
        backend, _, clock = make(gpu)
        assert tick(backend, clock).mig_instances is not None
        gpu.mig_mode = 0
        with capture_logs() as logs:
            reading = tick(backend, clock, 10.0)
        assert (reading.mig_enabled, reading.mig_instances) == (False, None)
        assert used(reading) == {11: 5 * GiB}  # the whole GPU's listing, as on any GPU not in MIG mode
        assert [(e["mode"], e["was"]) for e in events(logs, "nvml_mig_mode_changed")] == [("disabled", "enabled")]

    def test_a_mode_no_nvml_defines_is_unknown(self) -> None:
        """A current mode that is neither disabled (0) nor enabled (1) is unknown (None), not "disabled"."""
        backend, fake, clock = make(FakeGpu(uuid=UUID, mig_mode=7, mig_devices=[FakeMig(uuid=MIG_A)]))
        reading = tick(backend, clock)
        assert (reading.mig_enabled, reading.mig_instances) == (None, None)
        assert fake.calls["nvmlDeviceGetMaxMigDeviceCount"] == 0


class TestInstances:
    def test_processes_get_their_instances_used_bytes(self) -> None:
        """Each process's bytes come from the MIG device it runs in (the parent says "not available")."""
        backend, fake, clock = make(
            mig_gpu(
                FakeMig(uuid=MIG_A, memory_total=20 * GiB, memory_used=9 * GiB, compute=[(11, 8 * GiB)]),
                FakeMig(uuid=MIG_B, memory_total=40 * GiB, memory_used=2 * GiB, compute=[(12, GiB)]),
            )
        )
        reading = tick(backend, clock)
        assert used(reading) == {11: 8 * GiB, 12: GiB}
        assert reading.mig_instances is not None
        assert [(i.uuid, i.index, i.memory_used_bytes, i.memory_total_bytes) for i in reading.mig_instances] == [
            (MIG_A, 0, 9 * GiB, 20 * GiB),
            (MIG_B, 1, 2 * GiB, 40 * GiB),
        ]
        assert reading.mig_instances[0].processes == (ProcessReading(pid=11, used_memory_bytes=8 * GiB),)
        parent = fake.nvmlDeviceGetComputeRunningProcesses_v3(fake.nvmlDeviceGetHandleByIndex(0))
        assert {p.usedGpuMemory for p in parent} == {None}  # what the governor read before: no budget could hold

    def test_a_process_in_two_instances_gets_the_sum(self) -> None:
        """A process in two MIG devices of one GPU counts the bytes of both (its budget is per GPU)."""
        backend, _, clock = make(
            mig_gpu(FakeMig(uuid=MIG_A, compute=[(11, 3 * GiB)]), FakeMig(uuid=MIG_B, compute=[(11, 2 * GiB)]))
        )
        assert used(tick(backend, clock)) == {11: 5 * GiB}

    def test_compute_instances_of_one_gpu_instance_count_a_process_once(self) -> None:
        """Two MIG devices of one GPU instance (sharing its memory) both listing a process count it once, at
        the most either says; across GPU instances its bytes add up."""
        backend, _, clock = make(
            mig_gpu(
                FakeMig(uuid=MIG_A, gpu_instance_id=1, compute=[(11, 3 * GiB)]),
                FakeMig(uuid=MIG_B, gpu_instance_id=1, compute=[(11, 2 * GiB)]),
                FakeMig(uuid=MIG_C, gpu_instance_id=2, compute=[(11, GiB)]),
            )
        )
        reading = tick(backend, clock)
        assert used(reading) == {11: 4 * GiB}
        assert reading.mig_instances is not None
        assert [i.gpu_instance_id for i in reading.mig_instances] == [1, 1, 2]

    def test_an_unknown_share_makes_the_sum_unknown(self) -> None:
        """A process whose bytes one instance cannot say has an unknown use, never a partial sum."""
        backend, _, clock = make(
            mig_gpu(FakeMig(uuid=MIG_A, compute=[(11, 3 * GiB)]), FakeMig(uuid=MIG_B, compute=[(11, None)]))
        )
        assert used(tick(backend, clock)) == {11: None}

    def test_empty_indexes_are_skipped(self) -> None:
        """MIG device indexes answering NOT_FOUND are skipped; the others keep their own index."""
        backend, fake, clock = make(mig_gpu(None, FakeMig(uuid=MIG_A), None, FakeMig(uuid=MIG_B)))
        reading = tick(backend, clock)
        assert reading.mig_instances is not None
        assert [(i.index, i.uuid) for i in reading.mig_instances] == [(1, MIG_A), (3, MIG_B)]
        assert fake.calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 7  # every index up to the maximum

    def test_mig_mode_without_instances_reads_an_empty_tuple(self) -> None:
        """A GPU in MIG mode with no instance created has no instances (not None: the reads worked)."""
        backend, _, clock = make(mig_gpu())
        reading = tick(backend, clock)
        assert reading.mig_instances == () and reading.processes == ()

    def test_per_tick_cost_is_two_reads_per_instance(self) -> None:
        """Between the slow reads a MIG GPU adds its instances' memory and compute reads, and nothing else."""
        backend, fake, clock = make(mig_gpu(FakeMig(uuid=MIG_A), FakeMig(uuid=MIG_B)))
        tick(backend, clock)
        before, mig_before = Counter(fake.calls), Counter(fake.mig_calls)
        tick(backend, clock)
        assert Counter(fake.mig_calls) - mig_before == Counter(
            {"nvmlDeviceGetMemoryInfo_v2": 2, "nvmlDeviceGetComputeRunningProcesses_v3": 2}
        )
        added = Counter(fake.calls) - before - PER_TICK_CALLS
        assert added == Counter({"nvmlDeviceGetMemoryInfo_v2": 2, "nvmlDeviceGetComputeRunningProcesses_v3": 2})

    def test_power_and_thermal_stay_per_physical_gpu(self) -> None:
        """Only UUID, memory and compute processes are asked of MIG devices; temperature, power and limits are
        the parent's, and a power limit is set on the parent."""
        backend, fake, clock = make(mig_gpu(FakeMig(uuid=MIG_A, compute=[(11, GiB)])))
        reading = tick(backend, clock)
        assert (reading.temperature_c, reading.power_w, reading.power_limit_w) == (40.0, 85.097, 700.0)
        backend.set_power_limit(UUID, 500.0)
        for _ in range(12):
            tick(backend, clock)
        assert set(fake.mig_calls) == {
            "nvmlDeviceGetUUID",
            "nvmlDeviceGetGpuInstanceId",
            "nvmlDeviceGetMemoryInfo_v2",
            "nvmlDeviceGetComputeRunningProcesses_v3",
        }
        assert fake.gpus[0].enforced_limit_mw == 500_000

    def test_an_instance_over_its_total_has_no_memory(self) -> None:
        """An instance reporting more used than it has (a broken answer) has unknown memory, never a number."""
        backend, _, clock = make(mig_gpu(FakeMig(uuid=MIG_A, memory_total=10 * GiB, memory_used=11 * GiB)))
        reading = tick(backend, clock)
        assert reading.mig_instances is not None
        assert (reading.mig_instances[0].memory_used_bytes, reading.mig_instances[0].memory_total_bytes) == (
            None,
            10 * GiB,
        )


class TestLayoutChanges:
    def test_an_instance_that_vanishes_between_ticks_is_dropped_at_once(self) -> None:
        """An instance destroyed between ticks (its handle now invalid) is gone from the next reading; no fallback."""
        gpu = mig_gpu(FakeMig(uuid=MIG_A, compute=[(11, GiB)]), FakeMig(uuid=MIG_B, compute=[(12, 2 * GiB)]))
        backend, _, clock = make(gpu)
        tick(backend, clock)
        gpu.mig_devices[0] = None
        with capture_logs() as logs:
            reading = tick(backend, clock)
        assert reading.mig_instances is not None and [i.uuid for i in reading.mig_instances] == [MIG_B]
        assert used(reading) == {12: 2 * GiB}
        assert events(logs, "nvml_mig_fallback") == []
        assert [e["instances"] for e in events(logs, "nvml_mig_instances_changed")] == [[MIG_B]]

    def test_an_instance_created_between_ticks_is_seen_at_once(self) -> None:
        """A process the parent lists but no known instance does makes the adapter list the instances anew,
        in the same tick: a new instance's process gets its bytes at once."""
        gpu = mig_gpu(FakeMig(uuid=MIG_A, compute=[(11, GiB)]))
        backend, fake, clock = make(gpu)
        tick(backend, clock)
        gpu.mig_devices.append(FakeMig(uuid=MIG_B, memory_used=3 * GiB, compute=[(12, 3 * GiB)]))
        listed = fake.calls["nvmlDeviceGetMaxMigDeviceCount"]
        reading = tick(backend, clock)
        assert reading.mig_instances is not None and [i.uuid for i in reading.mig_instances] == [MIG_A, MIG_B]
        assert used(reading) == {11: GiB, 12: 3 * GiB}
        assert fake.calls["nvmlDeviceGetMaxMigDeviceCount"] == listed + 1
        tick(backend, clock)
        assert fake.calls["nvmlDeviceGetMaxMigDeviceCount"] == listed + 1  # listed once, not every tick

    def test_a_parent_process_no_instance_lists_is_kept_and_listed_once(self) -> None:
        """A process only the parent lists keeps the parent's entry, and lists the instances anew only once."""
        gpu = mig_gpu(FakeMig(uuid=MIG_A, compute=[(11, GiB)]), compute=[(99, None)])
        backend, fake, clock = make(gpu)
        tick(backend, clock)
        listed = fake.calls["nvmlDeviceGetMaxMigDeviceCount"]
        readings = [tick(backend, clock) for _ in range(5)]
        assert [used(r) for r in readings] == [{11: GiB, 99: None}] * 5
        assert fake.calls["nvmlDeviceGetMaxMigDeviceCount"] == listed

    def test_instances_are_listed_again_at_the_slow_cadence(self) -> None:
        """The MIG devices are listed on the first tick and again with each 10 s slow read."""
        backend, fake, clock = make(mig_gpu(FakeMig(uuid=MIG_A)))
        for _ in range(21):
            tick(backend, clock)
        assert fake.calls["nvmlDeviceGetMaxMigDeviceCount"] == 3  # at 1 s, 11 s and 21 s

    def test_a_gpu_lost_and_back_lists_its_instances_anew(self) -> None:
        """A lost GPU reads LOST (no instances); back, its MIG devices are listed again on their new handles."""
        gpu = mig_gpu(FakeMig(uuid=MIG_A, compute=[(11, GiB)]))
        backend, _, clock = make(gpu)
        tick(backend, clock)
        gpu.lost = True
        lost = tick(backend, clock)
        assert lost.health is GpuHealth.LOST and lost.mig_instances is None
        gpu.lost = False
        gpu.mig_devices = [FakeMig(uuid=MIG_B, compute=[(12, GiB)])]  # reconfigured while it was away
        back = tick(backend, clock, 2.0)
        assert back.health is GpuHealth.OK
        assert back.mig_instances is not None and [i.uuid for i in back.mig_instances] == [MIG_B]
        assert used(back) == {12: GiB}


class TestErrors:
    @pytest.mark.parametrize(
        ("where", "symbol", "code"),
        [
            ("device", "nvmlDeviceGetMemoryInfo_v2", NVML_ERROR_NOT_SUPPORTED),
            ("device", "nvmlDeviceGetComputeRunningProcesses_v3", NVML_ERROR_NO_PERMISSION),
            ("device", "nvmlDeviceGetUUID", NVML_ERROR_UNKNOWN),
            ("parent", "nvmlDeviceGetMaxMigDeviceCount", NVML_ERROR_NOT_SUPPORTED),
            ("parent", "nvmlDeviceGetMigDeviceHandleByIndex", NVML_ERROR_UNKNOWN),
            ("parent", "nvmlDeviceGetMigDeviceHandleByIndex", NVML_ERROR_GPU_IS_LOST),
        ],
    )
    def test_failed_per_instance_reads_fall_back_once(self, where: str, symbol: str, code: int) -> None:
        """A per-instance read that keeps failing (NotSupported, no permission, unknown, lost) falls back to the
        parent's memory and processes, said once; the GPU stays governed (not lost, power read), and the
        per-instance reads are tried again only at the slow cadence; once they work, that is said too."""
        device = FakeMig(uuid=MIG_A, compute=[(11, GiB)])
        gpu = mig_gpu(device, compute=[(50, None)])
        failing = device if where == "device" else gpu
        failing.errors[symbol] = code
        backend, fake, clock = make(gpu)
        with capture_logs() as logs:
            readings = [tick(backend, clock) for _ in range(9)]
            assert fake.calls["nvmlDeviceGetMaxMigDeviceCount"] <= 2  # one tick's two tries, no more
            del failing.errors[symbol]
            back = tick(backend, clock, 2.0)  # at the next slow read
        assert {r.mig_instances for r in readings} == {None}
        assert {r.health for r in readings} == {GpuHealth.OK} and readings[-1].power_w == 85.097
        assert used(readings[-1]) == {50: None, 11: None}  # the parent's listing, as before MIG support
        assert readings[-1].memory_used_bytes == gpu.memory_used  # the parent's memory
        (fallback,) = events(logs, "nvml_mig_fallback")
        assert fallback["gpu"] == 0 and fallback["reason"]
        assert back.mig_instances is not None and used(back) == {11: GiB, 50: None}
        assert len(events(logs, "nvml_mig_recovered")) == 1

    def test_bindings_without_the_mig_device_calls_fall_back(self) -> None:
        """An nvidia-ml-py that knows the mode but not the MIG device calls falls back, naming the missing call."""
        backend, _, clock = make(mig_gpu(FakeMig(uuid=MIG_A)), missing={"nvmlDeviceGetMaxMigDeviceCount"})
        with capture_logs() as logs:
            reading = tick(backend, clock)
        assert reading.mig_enabled is True and reading.mig_instances is None
        (fallback,) = events(logs, "nvml_mig_fallback")
        assert "nvmlDeviceGetMaxMigDeviceCount" in fallback["reason"]

    def test_a_driver_without_the_mig_device_calls_falls_back(self) -> None:
        """A driver answering FUNCTION_NOT_FOUND for the MIG device calls falls back, once."""
        backend, _, clock = make(mig_gpu(FakeMig(uuid=MIG_A)), absent_symbols={"nvmlDeviceGetMigDeviceHandleByIndex"})
        with capture_logs() as logs:
            readings = [tick(backend, clock, 5.0) for _ in range(4)]
        assert {r.mig_instances for r in readings} == {None}
        assert len(events(logs, "nvml_mig_fallback")) == 1

    def test_two_devices_with_one_uuid_are_refused(self) -> None:
        """MIG devices answering the same UUID (a broken answer) fall back rather than mix their values."""
        backend, _, clock = make(mig_gpu(FakeMig(uuid=MIG_A), FakeMig(uuid=MIG_A)))
        with capture_logs() as logs:
            reading = tick(backend, clock)
        assert reading.mig_instances is None
        assert "same UUID" in events(logs, "nvml_mig_fallback")[0]["reason"]

    @pytest.mark.parametrize("count", [-1, 10_000])
    def test_an_implausible_device_count_falls_back(self, count: int) -> None:
        """A maximum MIG device count no GPU has falls back instead of asking thousands of indexes."""
        backend, fake, clock = make(mig_gpu(FakeMig(uuid=MIG_A), max_mig_devices=count))
        assert tick(backend, clock).mig_instances is None
        assert fake.calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 0

    def test_a_version_mismatch_on_a_mig_device_is_fatal(self) -> None:
        """A driver/library mismatch answered on a MIG device is fatal as anywhere else (a restart is needed)."""
        device = FakeMig(uuid=MIG_A)
        backend, _, clock = make(mig_gpu(device))
        tick(backend, clock)
        device.errors["nvmlDeviceGetMemoryInfo_v2"] = NVML_ERROR_LIB_RM_VERSION_MISMATCH
        with pytest.raises(BackendFatal, match="restart needed"):
            tick(backend, clock)

    def test_an_instance_failing_then_gone_reads_without_it(self) -> None:
        """An instance whose read fails because it was destroyed is dropped after listing anew (no fallback), and
        an error of the parent that is not about MIG devices leaves the instances alone."""
        gpu = mig_gpu(FakeMig(uuid=MIG_A), FakeMig(uuid=MIG_B, compute=[(12, GiB)]))
        backend, fake, clock = make(gpu)
        tick(backend, clock)
        fake.stale_mig_error = NVML_ERROR_UNKNOWN
        gpu.mig_devices[1] = None
        gpu.mig_devices.append(FakeMig(uuid=MIG_C))
        with capture_logs() as logs:
            reading = tick(backend, clock)
        assert reading.mig_instances is not None and [i.uuid for i in reading.mig_instances] == [MIG_A, MIG_C]
        assert events(logs, "nvml_mig_fallback") == [] and reading.health is GpuHealth.OK
