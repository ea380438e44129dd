"""NvmlBackend's telemetry against a fake pynvml: units, slow cadence, NotSupported, XID events, lost GPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor.backends import BackendFatal
from governor.backends._nvml_events import MAX_EVENTS_PER_POLL
from governor.backends.nvml import NvmlBackend
from governor.clock import VirtualClock
from governor.config import Config
from governor.model import GpuHealth, GpuReading, GpuTelemetry
from tests.builders import build_daemon
from tests.fake_pynvml import (
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    NVML_ERROR_NO_DATA,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_MEMORY_ERROR_TYPE_CORRECTED,
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    NVML_PERF_POLICY_POWER,
    NVML_PERF_POLICY_SYNC_BOOST,
    NVML_VOLATILE_ECC,
    FakeGpu,
    FakeNvml,
)

UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"


def make(*gpus: FakeGpu, **kwargs: Any) -> tuple[NvmlBackend, FakeNvml, VirtualClock]:
    """A backend over a fake NVML with the given GPUs (one default H100 when none)."""
    fake_kwargs = {k: kwargs.pop(k) for k in ("absent_symbols", "missing") if k in kwargs}
    fake = FakeNvml(gpus or [FakeGpu(uuid=UUID0)], **fake_kwargs)
    clock = VirtualClock()
    return NvmlBackend(clock, nvml=fake, **kwargs), fake, clock


def telemetry(reading: GpuReading) -> GpuTelemetry:
    assert reading.telemetry is not None
    return reading.telemetry


def events_s(reading: GpuReading) -> dict[str, float]:
    return dict(reading.clock_event_s or ())


class TestValues:
    def test_every_reading_in_its_unit(self) -> None:
        """Clocks in MHz, pstate, memory temperature in C, fan ratios, ECC counts, remapped rows, NVML counters in s."""
        fake_gpu = FakeGpu(
            uuid=UUID0,
            sm_clock_mhz=1980,
            memory_clock_mhz=2619,
            pstate=2,
            memory_temperature_c=41,
            fans=[30, 75],
            violation_ns={NVML_PERF_POLICY_POWER: 2_500_000_000, NVML_PERF_POLICY_SYNC_BOOST: 0},
            ecc={(NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC): 7, (NVML_MEMORY_ERROR_TYPE_UNCORRECTED, 1): 2},
            remapped_rows=(3, 1, 1, 0),
        )
        backend, _, _ = make(fake_gpu)
        reading = backend.read().gpus[0]
        t = telemetry(reading)
        assert reading.sm_clock_mhz == 1980.0
        assert (t.memory_clock_mhz, t.pstate, t.memory_temperature_c) == (2619.0, 2, 41.0)
        assert t.fan_speed_ratios == ((0, 0.30), (1, 0.75))
        assert t.ecc_errors == (
            ("corrected", "volatile", 7),
            ("corrected", "aggregate", 0),
            ("uncorrected", "volatile", 0),
            ("uncorrected", "aggregate", 2),
        )
        assert (t.remapped_rows_correctable, t.remapped_rows_uncorrectable) == (3, 1)
        assert (t.row_remap_pending, t.row_remap_failed) == (True, False)
        assert events_s(reading)["sw_power_cap"] == 2.5
        assert t.xid_errors == ()

    def test_unknown_pstate_is_none(self) -> None:
        """NVML's "unknown" performance state (32) is None, not a state."""
        backend, _, _ = make(FakeGpu(uuid=UUID0, pstate=32))
        assert telemetry(backend.read().gpus[0]).pstate is None


class TestSlowCadence:
    def test_slow_reads_once_per_refresh_fast_ones_every_tick(self) -> None:
        """ECC, remapped rows, violation counters, memory temperature, fans, pstate and the memory
        clock are read once per telemetry_refresh_s and carried forward; the reasons and the XID
        events every tick."""
        fake_gpu = FakeGpu(uuid=UUID0, fans=[50], memory_temperature_c=40)
        backend, fake, clock = make(fake_gpu, telemetry_refresh_s=10.0)
        slow = (
            "nvmlDeviceGetTotalEccErrors",
            "nvmlDeviceGetRemappedRows",
            "nvmlDeviceGetViolationStatus",
            "nvmlDeviceGetFieldValues",
            "nvmlDeviceGetFanSpeed_v2",
        )
        every_tick = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlEventSetWait_v2")
        before = {name: fake.calls[name] for name in (*slow, "nvmlDeviceGetPerformanceState", *every_tick)}
        readings = []
        for _ in range(10):  # t = 0 .. 9 s: one refresh
            readings.append(backend.read().gpus[0])
            fake_gpu.memory_temperature_c = 70
            clock.advance(1.0)
        assert fake.calls["nvmlDeviceGetTotalEccErrors"] - before["nvmlDeviceGetTotalEccErrors"] == 4
        for name in slow[1:]:
            expected = 2 if name == "nvmlDeviceGetViolationStatus" else 1  # two perf policies
            assert fake.calls[name] - before[name] == expected, name
        assert fake.calls["nvmlDeviceGetPerformanceState"] - before["nvmlDeviceGetPerformanceState"] == 1
        for name in every_tick:
            assert fake.calls[name] - before[name] == 10, name
        assert {telemetry(r).memory_temperature_c for r in readings} == {40.0}  # carried forward
        assert telemetry(backend.read().gpus[0]).memory_temperature_c == 70.0  # t = 10 s: refreshed


class TestNotSupported:
    def test_data_center_board_has_no_fan_series_and_is_not_asked_again(self) -> None:
        """A GPU whose fan count is NotSupported reports no fan speeds and its fans are never read."""
        backend, fake, clock = make(FakeGpu(uuid=UUID0, fans=None), telemetry_refresh_s=1.0)
        for _ in range(5):
            assert telemetry(backend.read().gpus[0]).fan_speed_ratios is None
            clock.advance(1.0)
        assert fake.calls["nvmlDeviceGetFanSpeed_v2"] == 0
        assert fake.calls["nvmlDeviceGetNumFans"] == 1

    def test_unsupported_field_is_none_and_never_asked_again(self) -> None:
        """A memory temperature NVML answers NotSupported for (in the field value) is None, logged
        once, and the field values call is never made again for that GPU (unlike a core field's rest)."""
        with capture_logs() as logs:
            backend, fake, clock = make(
                FakeGpu(uuid=UUID0, memory_temperature_c=None), unsupported_reprobe_s=5.0, telemetry_refresh_s=1.0
            )
            for _ in range(20):
                assert telemetry(backend.read().gpus[0]).memory_temperature_c is None
                clock.advance(1.0)
        assert fake.calls["nvmlDeviceGetFieldValues"] == 1
        logged = [e for e in logs if e["event"] == "nvml_field_not_supported" and e["field"] == "memory_temperature"]
        assert len(logged) == 1

    def test_ecc_unsupported_is_absent_never_zero(self) -> None:
        """ECC and remapped rows NotSupported (a GeForce board): None, not zero counts."""
        errors = {"nvmlDeviceGetTotalEccErrors": NVML_ERROR_NOT_SUPPORTED, "nvmlDeviceGetRemappedRows": 3}
        backend, _, _ = make(FakeGpu(uuid=UUID0, errors=errors))
        t = telemetry(backend.read().gpus[0])
        assert t.ecc_errors is None
        assert t.remapped_rows_correctable is None and t.row_remap_pending is None

    def test_denied_read_is_missing_this_refresh_and_asked_again(self) -> None:
        """ECC refused with NoPermission is None for that refresh and read again at the next one."""
        fake_gpu = FakeGpu(uuid=UUID0, errors={"nvmlDeviceGetTotalEccErrors": NVML_ERROR_NO_PERMISSION})
        backend, fake, clock = make(fake_gpu, telemetry_refresh_s=1.0)
        assert telemetry(backend.read().gpus[0]).ecc_errors is None
        del fake_gpu.errors["nvmlDeviceGetTotalEccErrors"]
        clock.advance(1.0)
        assert telemetry(backend.read().gpus[0]).ecc_errors is not None
        assert fake.calls["nvmlDeviceGetTotalEccErrors"] == 8

    def test_missing_bindings_leave_those_readings_absent(self) -> None:
        """An nvidia-ml-py without the newer calls (violation, pstate, fans, events) still reads;
        those values are None and the clock event seconds are integrated instead."""
        missing = {
            "nvmlDeviceGetViolationStatus",
            "nvmlDeviceGetPerformanceState",
            "nvmlDeviceGetNumFans",
            "nvmlDeviceGetFanSpeed_v2",
            "nvmlEventSetCreate",
            "nvmlDeviceGetRemappedRows",
        }
        backend, _, clock = make(FakeGpu(uuid=UUID0, clock_event_reasons=0x4), missing=missing)
        backend.read()
        clock.advance(2.0)
        reading = backend.read().gpus[0]
        t = telemetry(reading)
        assert reading.health is GpuHealth.OK
        assert t.pstate is None and t.fan_speed_ratios is None and t.xid_errors is None
        assert t.remapped_rows_correctable is None
        assert events_s(reading)["sw_power_cap"] == 2.0


class TestClockEventSeconds:
    def test_integrated_from_the_mask_between_ticks(self) -> None:
        """Reasons without an NVML counter accumulate the time between two ticks for each bit the
        first tick read; every reason starts at 0."""
        fake_gpu = FakeGpu(uuid=UUID0, clock_event_reasons=0x20 | 0x40)
        backend, _, clock = make(fake_gpu)
        first = events_s(backend.read().gpus[0])
        assert first["sw_thermal_slowdown"] == 0.0 and first["gpu_idle"] == 0.0
        clock.advance(1.5)
        fake_gpu.clock_event_reasons = 0x1
        backend.read()
        clock.advance(0.5)
        now = events_s(backend.read().gpus[0])
        assert now["sw_thermal_slowdown"] == 1.5 and now["hw_thermal_slowdown"] == 1.5
        assert now["gpu_idle"] == 0.5
        assert now["hw_slowdown"] == 0.0

    def test_nvml_counter_wins_where_nvml_keeps_one(self) -> None:
        """sw_power_cap and sync_boost are NVML's violation counters (ns -> s), not the integral."""
        fake_gpu = FakeGpu(uuid=UUID0, clock_event_reasons=0x4, violation_ns={NVML_PERF_POLICY_POWER: 7_000_000_000})
        backend, _, clock = make(fake_gpu, telemetry_refresh_s=100.0)
        backend.read()
        clock.advance(3.0)
        reading = backend.read().gpus[0]
        assert events_s(reading)["sw_power_cap"] == 7.0  # NVML's own, not 3 s integrated
        assert "sync_boost" in events_s(reading)  # NotSupported there: integrated, still 0

    def test_no_time_counted_across_an_unread_mask_or_a_lost_gpu(self) -> None:
        """An interval with the mask unread at either end, or the GPU lost, adds nothing."""
        fake_gpu = FakeGpu(uuid=UUID0, clock_event_reasons=0x20)
        backend, _, clock = make(fake_gpu, lost_backoff_initial_s=1.0)
        backend.read()
        fake_gpu.errors["nvmlDeviceGetCurrentClocksEventReasons"] = NVML_ERROR_NO_DATA  # transient
        clock.advance(5.0)
        assert backend.read().gpus[0].clock_event_s is not None
        del fake_gpu.errors["nvmlDeviceGetCurrentClocksEventReasons"]
        clock.advance(5.0)
        backend.read()
        fake_gpu.lost = True
        clock.advance(5.0)
        assert backend.read().gpus[0].health is GpuHealth.LOST
        fake_gpu.lost = False
        clock.advance(5.0)
        assert events_s(backend.read().gpus[0])["sw_thermal_slowdown"] == 0.0
        clock.advance(2.0)
        assert events_s(backend.read().gpus[0])["sw_thermal_slowdown"] == 2.0


class TestXid:
    def test_events_counted_by_gpu_and_code(self) -> None:
        """XID events queued since the last tick are counted per GPU and code; the set is polled without waiting."""
        backend, fake, _ = make(FakeGpu(uuid=UUID0), FakeGpu(uuid=UUID1, pci_bus_id=b"00000000:1A:00.0"))
        assert [telemetry(r).xid_errors for r in backend.read().gpus] == [(), ()]
        fake.xid(1, 79)
        fake.xid(1, 13)
        fake.xid(1, 13)
        gpus = backend.read().gpus
        assert telemetry(gpus[0]).xid_errors == ()
        assert telemetry(gpus[1]).xid_errors == ((13, 2), (79, 1))
        assert telemetry(backend.read().gpus[1]).xid_errors == ((13, 2), (79, 1))  # cumulative

    def test_a_storm_is_drained_a_bounded_number_per_tick(self) -> None:
        """At most MAX_EVENTS_PER_POLL events are taken per tick; the rest come with the next."""
        backend, fake, _ = make()
        for _ in range(MAX_EVENTS_PER_POLL + 8):
            fake.xid(0, 31)
        assert telemetry(backend.read().gpus[0]).xid_errors == ((31, MAX_EVENTS_PER_POLL),)
        assert telemetry(backend.read().gpus[0]).xid_errors == ((31, MAX_EVENTS_PER_POLL + 8),)

    @pytest.mark.parametrize("code", [NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_NO_PERMISSION])
    def test_gpu_nvml_refuses_has_no_xid_counter_reported_once(self, code: int) -> None:
        """Registration refused (NotSupported, NoPermission): that GPU's XID counter is absent (None),
        logged once; the other GPU is watched."""
        refused = FakeGpu(uuid=UUID0, errors={"nvmlDeviceRegisterEvents": code})
        with capture_logs() as logs:
            backend, fake, _ = make(refused, FakeGpu(uuid=UUID1))
            for _ in range(3):
                gpus = backend.read().gpus
        assert telemetry(gpus[0]).xid_errors is None
        assert telemetry(gpus[1]).xid_errors == ()
        assert [(e["gpu"], e["uuid"]) for e in logs if e["event"] == "nvml_xid_unavailable"] == [(0, UUID0)]
        assert fake.calls["nvmlDeviceRegisterEvents"] == 2

    def test_lost_gpu_keeps_its_count_and_is_watched_again(self) -> None:
        """A GPU lost at open is registered once reacquired; a lost GPU's reading still carries its XID count."""
        lost = FakeGpu(uuid=UUID0, errors={"nvmlDeviceGetName": NVML_ERROR_GPU_IS_LOST})
        backend, fake, clock = make(lost, lost_backoff_initial_s=1.0)
        assert fake.calls["nvmlDeviceRegisterEvents"] == 0
        assert backend.read().gpus[0].health is GpuHealth.LOST
        clock.advance(1.0)
        assert telemetry(backend.read().gpus[0]).xid_errors == ()
        assert fake.calls["nvmlDeviceRegisterEvents"] == 1
        fake.xid(0, 79)
        lost.lost = True
        reading = backend.read().gpus[0]
        assert reading.health is GpuHealth.LOST
        assert telemetry(reading).xid_errors == ((79, 1),)

    def test_wait_failure_is_logged_once_and_fatal_mismatch_raises(self) -> None:
        """A failing wait ends that tick's poll (one warning per code); a version mismatch is BackendFatal."""
        backend, fake, _ = make()
        fake.wait_error = NVML_ERROR_GPU_IS_LOST
        with capture_logs() as logs:
            for _ in range(3):
                assert backend.read().gpus[0].health is GpuHealth.OK
        assert [e["event"] for e in logs if e["event"] == "nvml_xid_poll_failed"] == ["nvml_xid_poll_failed"]
        fake.wait_error = NVML_ERROR_LIB_RM_VERSION_MISMATCH
        with pytest.raises(BackendFatal):
            backend.read()

    def test_set_freed_on_close_before_shutdown(self) -> None:
        """close() frees the event set once, before nvmlShutdown."""
        backend, fake, _ = make()
        backend.close()
        backend.close()
        (event_set,) = fake.event_sets
        assert event_set.freed
        assert fake.calls["nvmlEventSetFree"] == 1 and fake.shutdowns == 1

    def test_xid_is_a_warning_event_of_the_decision_log(self, tmp_path: Path) -> None:
        """A daemon on NVML logs gpu_xid_error (warning) with gpu, uuid and xid once per new XID."""
        backend, fake, clock = make(FakeGpu(uuid=UUID0))
        daemon = build_daemon(Config(state_dir=str(tmp_path), runtime_dir=""), backend, clock)
        with capture_logs() as logs:
            daemon.start()
            fake.xid(0, 79)
            for _ in range(3):
                clock.advance(1.0)
                daemon.tick()
            daemon.stop()
        xids = [e for e in logs if e["event"] == "gpu_xid_error"]
        assert len(xids) == 1
        assert (xids[0]["log_level"], xids[0]["gpu"], xids[0]["uuid"], xids[0]["xid"]) == ("warning", 0, UUID0, 79)


class TestLostMidRead:
    def test_gpu_lost_during_a_slow_read_reads_lost_then_recovers(self) -> None:
        """GPU_IS_LOST from a slow telemetry read makes the GPU LOST; once back, its telemetry reads again."""
        fake_gpu = FakeGpu(uuid=UUID0, errors={"nvmlDeviceGetRemappedRows": NVML_ERROR_GPU_IS_LOST})
        backend, _, clock = make(fake_gpu, lost_backoff_initial_s=1.0)
        assert backend.read().gpus[0].health is GpuHealth.LOST
        del fake_gpu.errors["nvmlDeviceGetRemappedRows"]
        clock.advance(1.0)
        reading = backend.read().gpus[0]
        assert reading.health is GpuHealth.OK
        assert telemetry(reading).remapped_rows_correctable == 0
