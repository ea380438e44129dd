"""The trace format: the real H100 trace, malformed files, and writing then reading records."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from governor.model import GpuHealth, GpuInfo, GpuReading, ProcessReading
from governor.trace import Trace, TraceError, device_record, read_trace, sample_record, write_records

SHARED_TRACE = Path(__file__).resolve().parents[2] / "shared/traces/h100-load.jsonl"
VENDORED_TRACE = Path(__file__).resolve().parent / "data/h100-load.jsonl"
H100_TRACE = SHARED_TRACE if SHARED_TRACE.exists() else VENDORED_TRACE

DEVICE: dict[str, Any] = {"record": "device", "gpu": 0, "uuid": "GPU-t", "name": "Test GPU", "interval_s": 1.0}


def sample(**fields: Any) -> dict[str, Any]:
    """A minimal valid sample record for GPU 0, with ``fields`` changed."""
    return {"record": "sample", "t": 1.0, "gpu": 0, "temperature_c": 50, **fields}


def write_lines(tmp_path: Path, *records: dict[str, Any] | str) -> Path:
    """A trace file with one line per record (strings written raw)."""
    path = tmp_path / "trace.jsonl"
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def h100() -> Trace:
    """The recorded H100 trace (skipped where the shared traces are absent)."""
    if not H100_TRACE.exists():
        pytest.skip(f"{H100_TRACE} not present")
    return read_trace(H100_TRACE)


class TestH100Trace:
    """The real trace recorded on an H100."""

    def test_sample_count(self, h100: Trace) -> None:
        """The trace holds one GPU with 236 samples."""
        assert list(h100.samples) == [0]
        assert len(h100.samples[0]) == 236

    def test_device_facts(self, h100: Trace) -> None:
        """The device record gives the H100's name, 200-700 W range, thresholds, memory and driver."""
        device = h100.devices[0]
        info = device.info
        assert info.uuid == "GPU-f3c1c444-0b96-889d-5c44-d5150de13261"
        assert info.name == "NVIDIA H100 80GB HBM3"
        assert (info.power_limit_min_w, info.power_limit_max_w, info.power_limit_default_w) == (200.0, 700.0, 700.0)
        assert (info.temperature_slowdown_c, info.temperature_shutdown_c) == (89.0, 95.0)
        assert info.memory_total_bytes == 85520809984
        assert info.driver_version == "580.159.04"
        assert (device.interval_s, device.profile) == (1.0, "shared")

    def test_first_sample(self, h100: Trace) -> None:
        """The first sample is idle at 39 C under the 700 W limit, with utilization as a 0-1 ratio."""
        first = h100.samples[0][0]
        assert first.t_s == 0.003
        r = first.reading
        assert (r.index, r.uuid) == (0, h100.devices[0].info.uuid)
        assert (r.temperature_c, r.power_limit_w, r.utilization_gpu_ratio) == (39.0, 700.0, 0.0)
        assert r.processes == ()
        assert first.sm_clock_mhz == 405.0

    def test_samples_in_time_order_and_shape(self, h100: Trace) -> None:
        """Samples are time-ordered, the GPU heats under load and names its workload processes."""
        samples = h100.samples[0]
        times = [s.t_s for s in samples]
        assert times == sorted(times)
        temps = [s.reading.temperature_c for s in samples if s.reading.temperature_c is not None]
        assert min(temps) == 38.0
        assert 70.0 <= max(temps) < 89.0
        names = {p.name for s in samples for p in (s.reading.processes or ())}
        assert names == {"primary", "secondary"}

    def test_snapshots_one_per_sample(self, h100: Trace) -> None:
        """snapshots() yields one single-GPU snapshot per sample, timed by the sample."""
        snaps = list(h100.snapshots())
        assert len(snaps) == 236
        assert [s.t_s for s in snaps] == [s.t_s for s in h100.samples[0]]
        assert all(len(s.gpus) == 1 for s in snaps)


class TestMalformed:
    """A malformed trace raises TraceError naming file:line and the field."""

    def error(self, tmp_path: Path, *records: dict[str, Any] | str) -> str:
        """The TraceError message for a file of ``records``."""
        path = write_lines(tmp_path, *records)
        with pytest.raises(TraceError) as caught:
            read_trace(path)
        return str(caught.value)

    def test_not_json(self, tmp_path: Path) -> None:
        """A line that is not JSON is named by file and line."""
        path = tmp_path / "trace.jsonl"
        message = self.error(tmp_path, DEVICE, "{broken")
        assert message.startswith(f"{path}:2: not JSON")

    def test_not_an_object(self, tmp_path: Path) -> None:
        """A JSON line that is not an object is refused."""
        assert ":2: expected a JSON object" in self.error(tmp_path, DEVICE, "[1, 2]")

    @pytest.mark.parametrize(
        ("bad", "field"),
        [
            ({"temperature_c": "hot"}, "temperature_c"),
            ({"temperature_c": True}, "temperature_c"),
            ({"power_w": [1]}, "power_w"),
            ({"t": None}, "t"),
            ({"gpu": "zero"}, "gpu"),
            ({"processes": {"pid": 1}}, "processes"),
            ({"processes": [5]}, "processes[0]"),
            ({"processes": [{"name": "x"}]}, "pid"),
            ({"processes": [{"pid": 1, "used_memory_bytes": "lots"}]}, "used_memory_bytes"),
        ],
    )
    def test_bad_sample_field(self, tmp_path: Path, bad: dict[str, Any], field: str) -> None:
        """A sample with a field of the wrong type names file:line and the field."""
        path = tmp_path / "trace.jsonl"
        message = self.error(tmp_path, DEVICE, sample(**bad))
        assert message.startswith(f"{path}:2: ")
        assert f"field '{field}'" in message

    def test_missing_field_named(self, tmp_path: Path) -> None:
        """A sample without its time says field 't' got nothing."""
        record = sample()
        del record["t"]
        assert "field 't': expected a number, got nothing" in self.error(tmp_path, DEVICE, record)

    def test_device_gpu_required(self, tmp_path: Path) -> None:
        """A device record without a gpu index is refused at line 1."""
        device = {k: v for k, v in DEVICE.items() if k != "gpu"}
        assert ":1: field 'gpu'" in self.error(tmp_path, device)

    def test_unknown_record_kind(self, tmp_path: Path) -> None:
        """A record that is neither device nor sample names field 'record'."""
        assert ":2: field 'record'" in self.error(tmp_path, DEVICE, {"record": "comment"})

    def test_sample_before_device(self, tmp_path: Path) -> None:
        """A sample for a GPU with no device record yet is refused at its line."""
        assert ":1: sample for GPU 0 before its device record" in self.error(tmp_path, sample())

    def test_time_going_backwards(self, tmp_path: Path) -> None:
        """Samples of one GPU out of time order name field 't' at the late line."""
        message = self.error(tmp_path, DEVICE, sample(t=5.0), sample(t=4.0))
        assert ":3: field 't'" in message

    def test_no_device(self, tmp_path: Path) -> None:
        """An empty trace is refused."""
        assert "no device record" in self.error(tmp_path, "")

    def test_nan_refused(self, tmp_path: Path) -> None:
        """A NaN temperature (json allows it) is not a number here."""
        line = json.dumps(sample()).replace('"temperature_c": 50', '"temperature_c": NaN')
        assert "field 'temperature_c'" in self.error(tmp_path, DEVICE, line)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A file that does not exist is a TraceError naming it."""
        with pytest.raises(TraceError, match="cannot open"):
            read_trace(tmp_path / "none.jsonl")

    def test_not_utf8(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 are a TraceError, not a crash."""
        path = tmp_path / "trace.jsonl"
        path.write_bytes(json.dumps(DEVICE).encode() + b"\n\xff\xfe\n")
        with pytest.raises(TraceError, match="not UTF-8"):
            read_trace(path)

    def test_blank_lines_ignored(self, tmp_path: Path) -> None:
        """Blank lines between records are skipped."""
        trace = read_trace(write_lines(tmp_path, DEVICE, "", "   ", sample()))
        assert len(trace.samples[0]) == 1


INFO = GpuInfo(
    index=1,
    uuid="GPU-rt",
    name="NVIDIA GeForce RTX 4070",
    pci_bus_id="00000000:01:00.0",
    power_limit_min_w=100.0,
    power_limit_max_w=220.0,
    power_limit_default_w=200.0,
    temperature_slowdown_c=90.0,
    temperature_shutdown_c=100.0,
    memory_total_bytes=12 * 2**30,
    driver_version="550.1",
)


def readings() -> list[GpuReading]:
    """Readings exercising every recorded field, including missing values and a lost GPU."""
    procs = (
        ProcessReading(pid=10, used_memory_bytes=2**30, name="python3"),
        ProcessReading(pid=11, used_memory_bytes=None),
    )
    return [
        GpuReading(
            index=1,
            uuid="GPU-rt",
            temperature_c=61.0,
            power_w=150.25,
            power_limit_w=200.0,
            memory_used_bytes=2**31,
            memory_total_bytes=12 * 2**30,
            utilization_gpu_ratio=0.5,
            clock_event_reasons=4,
            sm_clock_mhz=2505.0,
            power_limit_requested_w=190.0,
            energy_j=123456.789,
            processes=procs,
        ),
        GpuReading(index=1, uuid="GPU-rt", temperature_c=None, memory_total_bytes=12 * 2**30, processes=None),
        GpuReading(index=1, uuid="GPU-rt", memory_total_bytes=12 * 2**30, health=GpuHealth.LOST),
    ]


class TestRoundTrip:
    """device_record and sample_record read back through read_trace."""

    def written(self, tmp_path: Path) -> Trace:
        """Write INFO and readings() as a trace file and read it back."""
        path = tmp_path / "rt.jsonl"
        with path.open("w", encoding="utf-8") as out:
            write_records(out, [device_record(INFO, 0.5, "rtx4070")])
            write_records(out, [sample_record(1.5 * i, r) for i, r in enumerate(readings())])
        return read_trace(path)

    def test_device_round_trip(self, tmp_path: Path) -> None:
        """Every GpuInfo field, the interval and the profile come back equal."""
        device = self.written(tmp_path).devices[1]
        assert device.info == INFO
        assert (device.interval_s, device.profile) == (0.5, "rtx4070")

    def test_samples_round_trip(self, tmp_path: Path) -> None:
        """Every recorded reading comes back equal, with its time, clock and health."""
        samples = self.written(tmp_path).samples[1]
        assert [s.reading for s in samples] == readings()
        assert [s.t_s for s in samples] == [0.0, 1.5, 3.0]
        assert [s.sm_clock_mhz for s in samples] == [2505.0, None, None]
        assert samples[0].utilization_gpu_pct == 50.0

    def test_write_records_is_json_lines(self) -> None:
        """write_records writes one JSON object per line."""
        out = io.StringIO()
        write_records(out, [device_record(INFO, 1.0), sample_record(0.0, readings()[0])])
        parsed = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [p["record"] for p in parsed] == ["device", "sample"]

    def test_sm_clock_defaults_to_reading(self) -> None:
        """sample_record takes the SM clock from the reading unless one is passed."""
        assert sample_record(0.0, readings()[0])["sm_clock_mhz"] == 2505.0
        assert sample_record(0.0, readings()[0], 1000.0)["sm_clock_mhz"] == 1000.0

    def test_time_rounded_to_milliseconds(self) -> None:
        """sample_record keeps t to the millisecond."""
        assert sample_record(1.23456, readings()[0])["t"] == 1.235

    def test_bad_health_named(self, tmp_path: Path) -> None:
        """A sample with an unknown health value names field 'health' at its line."""
        path = write_lines(tmp_path, DEVICE, sample(health="sleepy"))
        with pytest.raises(TraceError, match=r":2: field 'health'"):
            read_trace(path)
