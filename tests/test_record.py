"""governor.record: what it writes is a trace that governor.trace reads back unchanged."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import pytest

from governor.backends.nvml import NvmlBackend
from governor.clock import VirtualClock
from governor.model import GpuHealth, GpuInfo, Snapshot
from governor.record import record, run_record
from governor.trace import read_trace
from tests.fake_pynvml import FakeGpu, FakeNvml

UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"


def fake_backend(clock: VirtualClock) -> tuple[NvmlBackend, FakeNvml]:
    fake = FakeNvml(
        [
            FakeGpu(
                uuid=UUID0,
                temperature_c=72,
                power_mw=699_512,
                memory_used=6_442_450_944,
                utilization_pct=100,
                clock_event_reasons=0x4,
                sm_clock_mhz=1980,
                compute=[(4242, 6_000_000_000), (4343, None)],
            ),
            FakeGpu(uuid=UUID1, pci_bus_id=b"00000000:2A:00.0", errors={"nvmlDeviceGetPowerUsage": 3}),
        ]
    )
    return NvmlBackend(clock, nvml=fake, proc_root="/nonexistent"), fake


class TestRecord:
    def test_round_trip(self, tmp_path: Path) -> None:
        """A recorded trace is accepted by read_trace and its devices and values come back unchanged."""
        clock = VirtualClock(start_s=100.0)
        backend, _ = fake_backend(clock)
        path = tmp_path / "trace.jsonl"
        count = record(backend, path, 1.0, 5.0, clock, sleep=clock.advance)
        assert count == 10  # 5 ticks x 2 GPUs
        trace = read_trace(path)
        assert sorted(trace.devices) == [0, 1]
        info = trace.devices[0].info
        assert info == backend.gpus()[0]
        assert trace.devices[1].info.pci_bus_id == "00000000:2A:00.0"
        assert trace.devices[0].interval_s == 1.0
        samples = trace.samples[0]
        assert [s.t_s for s in samples] == [0.0, 1.0, 2.0, 3.0, 4.0]
        first = samples[0]
        assert first.reading.temperature_c == 72
        assert first.reading.power_w == pytest.approx(699.512)
        assert first.power_limit_w == 700.0
        assert first.reading.memory_used_bytes == 6_442_450_944
        assert first.reading.memory_total_bytes == 85_520_809_984
        assert first.utilization_gpu_pct == 100.0
        assert first.reading.clock_event_reasons == 0x4
        assert first.sm_clock_mhz == 1980.0
        assert first.reading.processes is not None
        assert [(p.pid, p.used_memory_bytes, p.name) for p in first.reading.processes] == [
            (4242, 6_000_000_000, None),
            (4343, None, None),
        ]
        assert trace.samples[1][0].reading.power_w is None  # NotSupported stays missing, not 0

    def test_health_written(self, tmp_path: Path) -> None:
        """Each sample line carries the reading's health."""
        clock = VirtualClock()
        backend, fake = fake_backend(clock)
        fake.gpus[1].lost = True
        path = tmp_path / "trace.jsonl"
        record(backend, path, 1.0, 1.0, clock, sleep=clock.advance)
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [line["record"] for line in lines] == ["device", "device", "sample", "sample"]
        assert [line["health"] for line in lines[2:]] == ["ok", "lost"]

    def test_duration_and_grid(self) -> None:
        """Ticks fall on the k * interval grid and stop before the duration is reached."""
        clock = VirtualClock()
        backend, _ = fake_backend(clock)
        out = io.StringIO()
        count = record(backend, out, 0.25, 1.0, clock, sleep=clock.advance)
        assert count == 8  # t = 0, 0.25, 0.5, 0.75 on 2 GPUs
        ts = [json.loads(line)["t"] for line in out.getvalue().splitlines()[2:]]
        assert ts == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]

    def test_slow_reads_skip_missed_ticks(self) -> None:
        """When a read outlasts the interval, missed ticks are skipped rather than bunched."""
        clock = VirtualClock()
        backend, _ = fake_backend(clock)
        out = io.StringIO()

        def slow_sleep(seconds: float) -> None:
            clock.advance(seconds + 1.5)  # every wait overshoots by more than an interval

        record(backend, out, 1.0, 10.0, clock, sleep=slow_sleep)
        ts = [json.loads(line)["t"] for line in out.getvalue().splitlines()[2:]][::2]
        assert ts == [0.0, 2.5, 4.5, 6.5, 8.5]  # never two ticks back to back

    def test_stop_event(self, tmp_path: Path) -> None:
        """Setting the stop event ends an unbounded recording after the tick in progress."""
        clock = VirtualClock()
        backend, _ = fake_backend(clock)
        stop = threading.Event()
        ticks = []

        def sleep(seconds: float) -> None:
            ticks.append(seconds)
            clock.advance(seconds)
            if len(ticks) == 3:
                stop.set()

        count = record(backend, tmp_path / "t.jsonl", 1.0, None, clock, sleep=sleep, stop_event=stop)
        assert count == 6

    def test_stop_event_cuts_the_wait(self, tmp_path: Path) -> None:
        """run_record waits on the stop event, so setting it ends a long wait at once."""
        clock = VirtualClock()
        backend, _ = fake_backend(clock)
        stop = threading.Event()
        threading.Timer(0.05, stop.set).start()
        count = run_record(backend, tmp_path / "t.jsonl", 3600.0, None, clock, stop_event=stop)
        assert count == 2

    def test_keyboard_interrupt(self, tmp_path: Path) -> None:
        """Ctrl-C ends the recording cleanly; every finished tick is in the file."""
        clock = VirtualClock()
        backend, _ = fake_backend(clock)
        calls = []

        def sleep(seconds: float) -> None:
            calls.append(seconds)
            if len(calls) == 2:
                raise KeyboardInterrupt
            clock.advance(seconds)

        path = tmp_path / "t.jsonl"
        assert record(backend, path, 1.0, None, clock, sleep=sleep) == 4
        assert len(read_trace(path).samples[0]) == 2

    def test_bad_arguments(self) -> None:
        """A non-positive interval or a negative duration is a ValueError."""
        clock = VirtualClock()
        backend, _ = fake_backend(clock)
        with pytest.raises(ValueError, match="interval_s"):
            record(backend, io.StringIO(), 0.0, 1.0, clock)
        with pytest.raises(ValueError, match="duration_s"):
            record(backend, io.StringIO(), 1.0, -1.0, clock)


SHARED_TRACE = Path(__file__).resolve().parent / "data" / "h100-load.jsonl"  # a copy of shared/traces/h100-load.jsonl


class _ReplayBackend:
    """A Backend that plays back the snapshots of a trace, one per read."""

    name = "replay"
    waiting_reason: str | None = None
    state_warning: str | None = None

    def __init__(self, infos: tuple[GpuInfo, ...], snapshots: list[Snapshot], clock: VirtualClock) -> None:
        self._infos = infos
        self._snapshots = iter(snapshots)
        self._clock = clock

    def gpus(self) -> tuple[GpuInfo, ...]:
        return self._infos

    def read(self) -> Snapshot:
        snap = next(self._snapshots)
        return Snapshot(t_s=self._clock.monotonic(), wall_time_s=self._clock.wall(), gpus=snap.gpus)

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        raise NotImplementedError

    def set_fan_speed(self, uuid: str, fan: int, percent: int) -> None:
        raise NotImplementedError

    def set_fan_auto(self, uuid: str, fan: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="shared H100 trace not present")
def test_real_trace_round_trip(tmp_path: Path) -> None:
    """Re-recording the real H100 trace gives back the same readings (the format is the shared one)."""
    original = read_trace(SHARED_TRACE)
    clock = VirtualClock()
    snapshots = list(original.snapshots())
    infos = tuple(d.info for d in original.devices.values())
    path = tmp_path / "again.jsonl"
    count = record(_ReplayBackend(infos, snapshots, clock), path, 1.0, float(len(snapshots)), clock, clock.advance)
    assert count == len(snapshots)
    again = read_trace(path)
    assert again.devices[0].info == original.devices[0].info
    for old, new in zip(original.samples[0], again.samples[0], strict=True):
        assert new.reading == old.reading
        assert new.utilization_gpu_pct == old.utilization_gpu_pct
    assert all(s.reading.health is GpuHealth.OK for s in again.samples[0])


def test_a_gpu_found_while_recording_gets_its_device_record(tmp_path: Path) -> None:
    """A GPU the adapter opens only at a later count of the GPUs (hot-plug) gets its device record before
    its first sample, so the trace stays readable and holds both GPUs."""
    clock = VirtualClock()
    fake = FakeNvml([FakeGpu(uuid=UUID0)])
    backend = NvmlBackend(clock, nvml=fake, proc_root="/nonexistent")
    fake.gpus.append(FakeGpu(uuid=UUID1, temperature_c=66))
    path = tmp_path / "trace.jsonl"
    record(backend, path, 1.0, 40.0, clock, sleep=clock.advance)
    trace = read_trace(path)
    assert [trace.devices[i].info.uuid for i in sorted(trace.devices)] == [UUID0, UUID1]
    assert len(trace.samples[0]) == 40
    assert 0 < len(trace.samples[1]) < 40  # from the count that found it on
    assert {s.reading.temperature_c for s in trace.samples[1]} == {66.0}


class TestPlantedOutput:
    """What another user may have put at the output path is never written through."""

    def test_a_planted_symlink_is_refused_and_its_target_untouched(self, tmp_path: Path) -> None:
        """An output path that is a symlink (to a file the recorder may write) is refused: the target is unchanged."""
        victim = tmp_path / "victim"
        victim.write_text("precious\n")
        link = tmp_path / "trace.jsonl"
        link.symlink_to(victim)
        clock = VirtualClock()
        backend, _ = fake_backend(clock)
        with pytest.raises(OSError) as raised:
            record(backend, link, 1.0, 2.0, clock, sleep=clock.advance)
        assert "symbolic link" in str(raised.value)
        assert victim.read_text() == "precious\n"

    def test_a_hard_link_to_another_file_is_not_truncated(self, tmp_path: Path) -> None:
        """An existing output path with a second link (a hard link planted to someone's file) is refused untouched."""
        victim = tmp_path / "victim"
        victim.write_text("precious\n")
        planted = tmp_path / "trace.jsonl"
        os.link(victim, planted)
        clock = VirtualClock()
        backend, _ = fake_backend(clock)
        with pytest.raises(OSError) as raised:
            record(backend, planted, 1.0, 2.0, clock, sleep=clock.advance)
        assert "other links" in str(raised.value)
        assert victim.read_text() == "precious\n"

    def test_a_fifo_is_refused_without_blocking(self, tmp_path: Path) -> None:
        """A FIFO at the output path (no reader) is refused at once instead of blocking the command."""
        fifo = tmp_path / "trace.jsonl"
        os.mkfifo(fifo)
        clock = VirtualClock()
        backend, _ = fake_backend(clock)
        with pytest.raises(OSError) as raised:
            record(backend, fifo, 1.0, 2.0, clock, sleep=clock.advance)
        assert "FIFO" in str(raised.value)

    def test_an_own_existing_file_is_overwritten(self, tmp_path: Path) -> None:
        """The recorder's own earlier trace at the path is truncated and written again."""
        path = tmp_path / "trace.jsonl"
        path.write_text("x" * 100_000)
        clock = VirtualClock()
        backend, _ = fake_backend(clock)
        assert record(backend, path, 1.0, 2.0, clock, sleep=clock.advance) == 4
        assert len(read_trace(path).samples[0]) == 2
