"""The trace format: JSON Lines of NVML samples, read by calibrate/replay, written by record.

A trace holds, per GPU, one ``device`` record (static facts) followed by ``sample``
records (one per GPU per interval), in time order. The format is documented in
``docs/trace-format.md``; it is the format of ``shared/traces/h100-load.jsonl``.

Units: ``t`` seconds since the start of the recording; ``temperature_c`` Celsius;
``power_w`` and ``power_limit_w`` watts; ``*_bytes`` bytes; ``utilization_gpu_pct``
percent (0-100); ``clock_event_reasons`` the NVML bitmask.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from governor.errors import TraceError as TraceError  # noqa: PLC0414  (re-exported)
from governor.model import GpuHealth, GpuInfo, GpuReading, ProcessReading, Snapshot, checked_power_range
from governor.schema import Issues, Key, convert, describe, short


@dataclass(frozen=True, slots=True)
class TraceDevice:
    """The static facts of one GPU in a trace."""

    info: GpuInfo
    interval_s: float | None
    profile: str | None


@dataclass(frozen=True, slots=True)
class TraceSample:
    """One sample of one GPU: a reading and its time since the start of the trace."""

    t_s: float
    reading: GpuReading
    power_limit_w: float | None
    utilization_gpu_pct: float | None
    sm_clock_mhz: float | None


@dataclass(frozen=True, slots=True)
class Trace:
    """A whole trace: devices by GPU index and their samples in time order."""

    source: str
    devices: dict[int, TraceDevice]
    samples: dict[int, tuple[TraceSample, ...]]

    def snapshots(self) -> Iterator[Snapshot]:
        """Per-tick snapshots: the i-th sample of every GPU forms tick i (a recorder
        samples all GPUs once per interval), timed by the earliest of them."""
        columns = [self.samples[gpu] for gpu in sorted(self.samples)]
        for row in zip(*columns):
            t = min(s.t_s for s in row)
            yield Snapshot(t_s=t, wall_time_s=t, gpus=tuple(s.reading for s in row))


_NUMBER = Key("float", "a number", type_expected="a number")
_TEXT = Key("str", "a string", type_expected="a string")


def _field(record: dict[str, Any], key: str, where: str, spec: Key, *, required: bool) -> Any:
    """``record[key]`` checked by the schema engine; None when absent (null); TraceError naming
    file:line and the field at the first problem (a trace is read in one pass)."""
    value = record.get(key)
    if value is None:
        if required:
            raise TraceError(f"{where}: field '{key}': expected {spec.wrong_type()}, got nothing")
        return None
    issues = Issues(where)
    converted = convert(spec, value, f"field '{key}'", issues)
    if issues.issues:
        raise TraceError(str(issues.issues[0]))
    return converted


def _num(record: dict[str, Any], key: str, where: str, *, required: bool = False) -> float | None:
    value: float | None = _field(record, key, where, _NUMBER, required=required)
    return value


def _text(record: dict[str, Any], key: str, where: str) -> str | None:
    value: str | None = _field(record, key, where, _TEXT, required=False)
    return value


def _int(record: dict[str, Any], key: str, where: str, *, required: bool = False, hi: float = math.inf) -> int | None:
    """A whole number, 0 to ``hi`` (written ``39`` or ``39.0``); a fraction is refused, never truncated."""
    value = _num(record, key, where, required=required)
    if value is None:
        return None
    if not value.is_integer() or not 0 <= value <= hi:
        bound = "" if hi == math.inf else f" at most {hi:g}"
        raise TraceError(f"{where}: field '{key}': expected a whole number of 0 or more{bound}, got {value!r}")
    return int(value)


def _gpu(record: dict[str, Any], where: str) -> int:
    """The record's GPU index (required), 0 to MAX_GPU_INDEX."""
    gpu = _int(record, "gpu", where, required=True, hi=MAX_GPU_INDEX)
    assert gpu is not None
    return gpu


def _device(record: dict[str, Any], where: str) -> TraceDevice:
    gpu = _gpu(record, where)
    # the range as the NVML adapter would have kept it (an impossible one is unknown)
    min_w, max_w, default_w, _ = checked_power_range(
        _num(record, "power_limit_min_w", where),
        _num(record, "power_limit_max_w", where),
        _num(record, "power_limit_default_w", where),
    )
    info = GpuInfo(
        index=gpu,
        uuid=str(record.get("uuid") or f"trace-gpu-{gpu}"),
        name=str(record.get("name") or "unknown GPU"),
        pci_bus_id=_text(record, "pci_bus_id", where),
        power_limit_min_w=min_w,
        power_limit_max_w=max_w,
        power_limit_default_w=default_w,
        temperature_slowdown_c=_num(record, "temperature_slowdown_c", where),
        temperature_shutdown_c=_num(record, "temperature_shutdown_c", where),
        memory_total_bytes=_int(record, "memory_total_bytes", where),
        driver_version=_text(record, "driver", where),
        fan_count=_int(record, "fan_count", where),
        fan_speed_min_percent=_num(record, "fan_speed_min_percent", where),
        fan_speed_max_percent=_num(record, "fan_speed_max_percent", where),
    )
    return TraceDevice(info=info, interval_s=_num(record, "interval_s", where), profile=_text(record, "profile", where))


def _processes(record: dict[str, Any], where: str) -> tuple[ProcessReading, ...] | None:
    raw = record.get("processes")
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise TraceError(f"{where}: field 'processes': expected a list, got {describe(raw)}")
    result = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise TraceError(f"{where}: field 'processes[{i}]': expected an object, got {describe(entry)}")
        pid = _int(entry, "pid", f"{where}: processes[{i}]", required=True)
        assert pid is not None
        name = entry.get("name")
        result.append(
            ProcessReading(
                pid=pid,
                used_memory_bytes=_int(entry, "used_memory_bytes", f"{where}: processes[{i}]"),
                name=None if name is None else str(name),
            )
        )
    return tuple(result)


def _sample(record: dict[str, Any], where: str, device: TraceDevice) -> TraceSample:
    t = _num(record, "t", where, required=True)
    assert t is not None
    util = _num(record, "utilization_gpu_pct", where)
    health_text = record.get("health", "ok")
    try:
        health = GpuHealth(health_text)
    except ValueError:
        got = describe(health_text)
        raise TraceError(f"{where}: field 'health': expected ok, degraded or lost, got {got}") from None
    reading = GpuReading(
        index=device.info.index,
        uuid=device.info.uuid,
        temperature_c=_num(record, "temperature_c", where),
        power_w=_num(record, "power_w", where),
        power_limit_w=_num(record, "power_limit_w", where),
        memory_used_bytes=_int(record, "memory_used_bytes", where),
        memory_total_bytes=_int(record, "memory_total_bytes", where) or device.info.memory_total_bytes,
        utilization_gpu_ratio=None if util is None else util / 100.0,
        clock_event_reasons=_int(record, "clock_event_reasons", where),
        sm_clock_mhz=_num(record, "sm_clock_mhz", where),
        power_limit_requested_w=_num(record, "power_limit_requested_w", where),
        energy_j=_num(record, "energy_j", where),
        processes=_processes(record, where),
        health=health,
    )
    return TraceSample(
        t_s=t,
        reading=reading,
        power_limit_w=reading.power_limit_w,
        utilization_gpu_pct=util,
        sm_clock_mhz=reading.sm_clock_mhz,
    )


MAX_TRACE_BYTES = 1 << 30
"""A trace larger than this (bytes) is refused unread: a day of 8 GPUs at 1 s is about 250 MB."""
MAX_LINE_BYTES = 1 << 20
"""The longest line read (bytes): a record is a few hundred bytes, a thousand processes fit."""
MAX_GPU_INDEX = 1023
"""The highest GPU index a record may name (the config's ``[[gpu]] index`` bound)."""


@contextlib.contextmanager
def _open_trace(path: Path) -> Iterator[IO[bytes]]:
    """The trace file opened for reading; TraceError when it is not a regular file of at most
    MAX_TRACE_BYTES. O_NONBLOCK: a FIFO with no writer is refused, not waited on forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TraceError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TraceError(f"{path}: expected a regular file, got a directory, device, FIFO or socket")
        if info.st_size > MAX_TRACE_BYTES:
            raise TraceError(f"{path}: expected a trace of at most {MAX_TRACE_BYTES} bytes, got {info.st_size}")
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as handle:
        yield handle


def read_text(path: Path | str) -> str:
    """The whole of ``path`` as UTF-8 text, read as a trace is (a regular file of at most
    MAX_TRACE_BYTES, a FIFO or device refused unread); TraceError naming the file otherwise."""
    path = Path(path)
    with _open_trace(path) as handle:
        try:
            raw = handle.read(MAX_TRACE_BYTES + 1)
        except OSError as exc:
            raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_TRACE_BYTES:
        raise TraceError(f"{path}: expected at most {MAX_TRACE_BYTES} bytes, got longer")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not UTF-8 text") from None


def _lines(handle: IO[bytes], path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, each at most MAX_LINE_BYTES and UTF-8; TraceError naming
    the file and line otherwise (also once more than MAX_TRACE_BYTES were read: the file grew)."""
    total = 0
    for number in itertools.count(1):
        try:
            raw = handle.readline(MAX_LINE_BYTES + 1)
        except OSError as exc:
            raise TraceError(f"{path}:{number}: cannot read: {exc.strerror or exc}") from None
        if not raw:
            return
        total += len(raw)
        if len(raw) > MAX_LINE_BYTES or total > MAX_TRACE_BYTES:
            what = f"a line of at most {MAX_LINE_BYTES}" if len(raw) > MAX_LINE_BYTES else f"at most {MAX_TRACE_BYTES}"
            raise TraceError(f"{path}:{number}: expected {what} bytes, got longer")
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TraceError(f"{path}:{number}: not UTF-8 text") from None


def _record(line: str, where: str) -> Any:
    """One line parsed as JSON; TraceError naming ``where`` for anything the decoder refuses."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON: {exc.msg}") from None
    except RecursionError:
        raise TraceError(f"{where}: not JSON the governor can read: nested too deeply") from None
    except ValueError as exc:  # an integer of more digits than Python converts (4300)
        raise TraceError(f"{where}: not JSON the governor can read: {short(str(exc), 120)}") from None


def read_trace(path: Path | str) -> Trace:
    """Read and check a trace file; raise TraceError naming the line of the first problem."""
    path = Path(path)
    devices: dict[int, TraceDevice] = {}
    samples: dict[int, list[TraceSample]] = {}
    with _open_trace(path) as handle:
        for number, line in _lines(handle, path):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            record = _record(line, where)
            if not isinstance(record, dict):
                raise TraceError(f"{where}: expected a JSON object")
            kind = record.get("record")
            if kind == "device":
                device = _device(record, where)
                devices[device.info.index] = device
                samples.setdefault(device.info.index, [])
            elif kind == "sample":
                gpu = _gpu(record, where)
                if gpu not in devices:
                    raise TraceError(f"{where}: sample for GPU {gpu} before its device record")
                sample = _sample(record, where, devices[gpu])
                previous = samples[gpu]
                if previous and sample.t_s < previous[-1].t_s:
                    raise TraceError(f"{where}: field 't': samples must be in time order")
                previous.append(sample)
            else:
                raise TraceError(f"{where}: field 'record': expected 'device' or 'sample', got {describe(kind)}")
    if not devices:
        raise TraceError(f"{path}: no device record")
    return Trace(source=str(path), devices=devices, samples={k: tuple(v) for k, v in samples.items()})


def device_record(info: GpuInfo, interval_s: float, profile: str | None = None) -> dict[str, Any]:
    """The ``device`` record for one GPU."""
    return {
        "record": "device",
        "gpu": info.index,
        "uuid": info.uuid,
        "name": info.name,
        "driver": info.driver_version,
        "pci_bus_id": info.pci_bus_id,
        "power_limit_min_w": info.power_limit_min_w,
        "power_limit_max_w": info.power_limit_max_w,
        "power_limit_default_w": info.power_limit_default_w,
        "memory_total_bytes": info.memory_total_bytes,
        "temperature_slowdown_c": info.temperature_slowdown_c,
        "temperature_shutdown_c": info.temperature_shutdown_c,
        "fan_count": info.fan_count,
        "fan_speed_min_percent": info.fan_speed_min_percent,
        "fan_speed_max_percent": info.fan_speed_max_percent,
        "profile": profile,
        "interval_s": interval_s,
    }


def sample_record(t_s: float, reading: GpuReading, sm_clock_mhz: float | None = None) -> dict[str, Any]:
    """The ``sample`` record for one GPU reading taken ``t_s`` seconds after the start.

    ``sm_clock_mhz`` defaults to the reading's own.
    """
    if sm_clock_mhz is None:
        sm_clock_mhz = reading.sm_clock_mhz
    util = reading.utilization_gpu_ratio
    processes = None
    if reading.processes is not None:
        processes = [
            {"pid": p.pid, "used_memory_bytes": p.used_memory_bytes, "name": p.name} for p in reading.processes
        ]
    return {
        "record": "sample",
        "t": round(t_s, 3),
        "gpu": reading.index,
        "temperature_c": reading.temperature_c,
        "power_w": reading.power_w,
        "power_limit_w": reading.power_limit_w,
        "memory_used_bytes": reading.memory_used_bytes,
        "memory_total_bytes": reading.memory_total_bytes,
        "utilization_gpu_pct": None if util is None else round(util * 100.0, 1),
        "clock_event_reasons": reading.clock_event_reasons,
        "sm_clock_mhz": sm_clock_mhz,
        "power_limit_requested_w": reading.power_limit_requested_w,
        "energy_j": reading.energy_j,
        "processes": processes,
        "health": reading.health.value,
    }


def write_records(out: IO[str], records: Iterable[dict[str, Any]]) -> None:
    """Write records as JSON Lines and flush, so a killed recorder loses at most one line."""
    for record in records:
        out.write(json.dumps(record, separators=(", ", ": ")) + "\n")
    out.flush()
