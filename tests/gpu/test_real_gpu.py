"""NvmlBackend on a real NVIDIA GPU, checked against nvidia-smi while a PyTorch load runs.

Marker ``gpu``; every test skips where NVML does not start (CI has no GPU). Read-only:
these tests never change a GPU setting (no power limit, clocks or persistence mode).
Each comparison is printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor.backends import BackendUnavailable
from governor.backends.nvml import NvmlBackend
from governor.clock import RealClock
from governor.model import GpuHealth, GpuReading
from governor.record import run_record
from governor.trace import read_trace

pytestmark = pytest.mark.gpu

LOAD_GIB = 3.0
LOAD_SECONDS = 60.0
LOAD_SCRIPT = Path(__file__).with_name("gpu_load.py")
MIB = 1 << 20


@pytest.fixture(scope="module")
def backend() -> Iterator[NvmlBackend]:
    """The real NVML backend, or a skip where no NVIDIA GPU answers."""
    pytest.importorskip("pynvml")
    try:
        nvml = NvmlBackend(RealClock())
    except BackendUnavailable as exc:
        pytest.skip(f"no NVIDIA GPU: {exc}")
    yield nvml
    nvml.close()


@pytest.fixture(scope="module")
def smi() -> str:
    path = shutil.which("nvidia-smi")
    if path is None:
        pytest.skip("nvidia-smi not found")
    return path


@dataclass(frozen=True)
class Load:
    pid: int
    gpu_index: int


@pytest.fixture(scope="module")
def load(backend: NvmlBackend) -> Iterator[Load]:
    """A PyTorch process holding LOAD_GIB GiB on NVML GPU 0 and running matmuls."""
    env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(LOAD_SCRIPT), str(LOAD_GIB), str(LOAD_SECONDS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip() == "ready":
            break
    else:
        proc.kill()
    if not lines or lines[-1].strip() != "ready":
        proc.kill()
        proc.wait()
        pytest.skip(f"PyTorch load did not start: {''.join(lines)[-2000:]}")
    time.sleep(3.0)  # let power and the sensors settle under load
    yield Load(pid=proc.pid, gpu_index=0)
    proc.kill()
    proc.wait()


def query_smi(smi: str) -> dict[int, tuple[float, float, float]]:
    """nvidia-smi's temperature (C), power draw (W) and memory used (MiB) per GPU index."""
    out = subprocess.run(
        [
            smi,
            "--query-gpu=index,temperature.gpu,power.draw,memory.used",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    result = {}
    for line in out.strip().splitlines():
        index, temp, power, mem = (field.strip() for field in line.split(","))
        result[int(index)] = (float(temp), float(power), float(mem))
    return result


def report(what: str, **values: object) -> None:
    print(f"\n[gpu] {what}: " + json.dumps(values, default=str), flush=True)


def test_static_facts_match_smi(backend: NvmlBackend, smi: str) -> None:
    """UUID, name, PCI id, driver, power-limit range and VRAM agree with nvidia-smi."""
    out = subprocess.run(
        [
            smi,
            "--query-gpu=index,uuid,name,pci.bus_id,driver_version,power.min_limit,power.max_limit,"
            "power.default_limit,memory.total",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    rows = {int(r[0]): r for r in (line.split(", ") for line in out.strip().splitlines())}
    for info in backend.gpus():
        row = rows[info.index]
        report("static", nvml=info, smi=row)
        assert info.uuid == row[1]
        assert info.name == row[2]
        assert info.pci_bus_id is not None and info.pci_bus_id.lower() == row[3].lower()
        assert info.driver_version == row[4]
        assert info.power_limit_min_w == pytest.approx(float(row[5]), abs=1.0)
        assert info.power_limit_max_w == pytest.approx(float(row[6]), abs=1.0)
        assert info.power_limit_default_w == pytest.approx(float(row[7]), abs=1.0)
        assert info.memory_total_bytes is not None
        assert abs(info.memory_total_bytes / MIB - float(row[8])) <= 1.0
        assert info.temperature_slowdown_c is not None
        assert info.temperature_shutdown_c is not None
        assert info.temperature_slowdown_c < info.temperature_shutdown_c


def _within(value: float | None, before: float | None, after: float | None, tolerance: float) -> bool:
    """``value`` lies within ``tolerance`` of the span between two readings around it."""
    assert value is not None and before is not None and after is not None
    return min(before, after) - tolerance <= value <= max(before, after) + tolerance


def test_readings_match_smi_under_load(backend: NvmlBackend, smi: str, load: Load) -> None:
    """Temperature within 2 C, power within 10 % and memory used within 1 % of nvidia-smi, under load."""
    for _ in range(5):
        before = backend.read()
        theirs = query_smi(smi)
        after = backend.read()
        for b, a in zip(before.gpus, after.gpus, strict=True):
            assert b.health is GpuHealth.OK and a.health is GpuHealth.OK
            temp, power, mem_mib = theirs[b.index]
            report(
                "compare",
                gpu=b.index,
                smi={"temperature_c": temp, "power_w": power, "memory_used_mib": mem_mib},
                nvml_before={
                    "temperature_c": b.temperature_c,
                    "power_w": b.power_w,
                    "memory_used_mib": None if b.memory_used_bytes is None else b.memory_used_bytes / MIB,
                },
                nvml_after={
                    "temperature_c": a.temperature_c,
                    "power_w": a.power_w,
                    "memory_used_mib": None if a.memory_used_bytes is None else a.memory_used_bytes / MIB,
                },
            )
            assert _within(temp, b.temperature_c, a.temperature_c, 2.0)
            assert _within(power, b.power_w, a.power_w, 0.10 * power)
            mem_b = None if b.memory_used_bytes is None else b.memory_used_bytes / MIB
            mem_a = None if a.memory_used_bytes is None else a.memory_used_bytes / MIB
            assert _within(mem_mib, mem_b, mem_a, max(0.01 * mem_mib, 2.0))
        time.sleep(0.5)
    loaded = after.gpus[load.gpu_index]
    assert loaded.utilization_gpu_ratio is not None and loaded.utilization_gpu_ratio > 0.5
    assert loaded.sm_clock_mhz is not None and loaded.sm_clock_mhz > 0
    assert loaded.power_limit_w is not None and loaded.power_limit_requested_w is not None
    assert loaded.energy_j is not None and loaded.energy_j > 0


def test_load_process_listed(backend: NvmlBackend, load: Load) -> None:
    """The load's pid appears in its GPU's process list with about LOAD_GIB GiB of VRAM and a name."""
    reading: GpuReading = backend.read().gpus[load.gpu_index]
    assert reading.processes is not None
    report("processes", gpu=reading.index, processes=reading.processes, load_pid=load.pid)
    mine = [p for p in reading.processes if p.pid == load.pid]
    assert len(mine) == 1
    assert mine[0].used_memory_bytes is not None
    assert mine[0].used_memory_bytes >= LOAD_GIB * (1 << 30)
    assert mine[0].used_memory_bytes < (LOAD_GIB + 2) * (1 << 30)
    assert mine[0].name is not None and mine[0].name.startswith("python")


def test_record_short_trace(backend: NvmlBackend, tmp_path: Path) -> None:
    """A 2 s recording at 0.5 s is a valid trace with every GPU's device record and 4 samples each."""
    path = tmp_path / "real.jsonl"
    count = run_record(backend, path, 0.5, 2.0, RealClock())
    gpus = backend.gpus()
    assert count == 4 * len(gpus)
    trace = read_trace(path)
    for info in gpus:
        assert trace.devices[info.index].info == info
        samples = trace.samples[info.index]
        assert len(samples) == 4
        assert all(s.reading.temperature_c is not None for s in samples)
        assert all(s.reading.power_w is not None for s in samples)
        ts = [s.t_s for s in samples]
        assert ts[0] < 0.25 and 1.4 < ts[-1] < 1.8
    report("trace", path=str(path), first_lines=path.read_text().splitlines()[: len(gpus) + 1])


def _nvml_answer(call: Callable[[], object]) -> str:
    """What NVML answers a direct, read-only call: "ok" or the name of its error."""
    import pynvml

    try:
        call()
    except pynvml.NVMLError as exc:
        return type(exc).__name__.removeprefix("NVMLError_")
    return "ok"


def test_telemetry_present_and_plausible_or_not_supported(backend: NvmlBackend) -> None:
    """Each telemetry reading is present with a plausible value, or absent because NVML answers
    NotSupported (asked directly); prints one support-table line per reading (run with -s)."""
    import pynvml

    first = backend.read()
    time.sleep(1.0)
    second = backend.read()
    for before, reading in zip(first.gpus, second.gpus, strict=True):
        handle = pynvml.nvmlDeviceGetHandleByIndex(reading.index)
        for name, value, plausible, direct in _telemetry_checks(pynvml, handle, reading):
            answer = _nvml_answer(direct)
            present = value is not None and (value != () or name == "xid_errors")
            line = f"| {reading.index} | {name} | {'present' if present else 'absent'} | {value!r} | NVML: {answer} |"
            print(f"\n[gpu-support] {line}", flush=True)
            if not present:
                assert answer == "NotSupported", f"{name} absent, but NVML answers {answer}"
            else:
                assert plausible, f"{name} = {value!r} is not plausible"
        # clock event seconds: every reason present and never going back
        seconds_before, seconds = dict(before.clock_event_s or ()), dict(reading.clock_event_s or ())
        print(f"\n[gpu-support] | {reading.index} | clock_event_s | {seconds} |", flush=True)
        assert seconds, "the clock event reasons answer on every NVIDIA GPU the governor supports"
        for reason, value_s in seconds.items():
            assert value_s >= seconds_before.get(reason, 0.0) >= 0.0, reason


def _telemetry_checks(
    pynvml: Any, handle: Any, reading: GpuReading
) -> list[tuple[str, object, bool, Callable[[], object]]]:
    """(name, the backend's value, whether it is plausible, the direct NVML call behind it) per reading."""
    t = reading.telemetry
    assert t is not None
    sm, mem, pstate, events = reading.sm_clock_mhz, t.memory_clock_mhz, t.pstate, reading.clock_event_s
    fans, ecc, memory_c = t.fan_speed_ratios, t.ecc_errors, t.memory_temperature_c
    rows, unc_rows = t.remapped_rows_correctable, t.remapped_rows_uncorrectable
    remap = None if rows is None else (rows, unc_rows, t.row_remap_pending, t.row_remap_failed)
    violation = pynvml.nvmlDeviceGetViolationStatus
    return [
        ("sm_clock_mhz", sm, sm is not None and 100 <= sm <= 4000,
         lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
        ("memory_clock_mhz", mem, mem is not None and 100 <= mem <= 30000,
         lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
        ("pstate", pstate, pstate is not None and 0 <= pstate <= 15,
         lambda: pynvml.nvmlDeviceGetPerformanceState(handle)),
        ("memory_temperature_c", memory_c, memory_c is not None and 10 <= memory_c <= 110,
         lambda: _field_or_raise(pynvml, handle, pynvml.NVML_FI_DEV_MEMORY_TEMP)),
        ("fan_speed_ratios", fans, all(0 <= r <= 1.2 for _, r in fans or ()),
         lambda: _fan_or_raise(pynvml, handle)),
        ("ecc_errors", ecc, len(ecc or ()) == 4 and all(n >= 0 for *_, n in ecc or ()),
         lambda: pynvml.nvmlDeviceGetTotalEccErrors(handle, 1, 1)),
        ("remapped_rows", remap, rows is not None and unc_rows is not None and min(rows, unc_rows) >= 0,
         lambda: pynvml.nvmlDeviceGetRemappedRows(handle)),
        ("violation_sw_power_cap_s", dict(events or ()).get("sw_power_cap"), True,
         lambda: violation(handle, pynvml.NVML_PERF_POLICY_POWER)),
        ("violation_sync_boost_s", dict(events or ()).get("sync_boost"), True,
         lambda: violation(handle, pynvml.NVML_PERF_POLICY_SYNC_BOOST)),
        ("xid_errors", t.xid_errors, t.xid_errors is not None, lambda: _xid_register(pynvml, handle)),
    ]  # fmt: skip


def _fan_or_raise(pynvml: Any, handle: Any) -> object:
    """Fan 0's speed; a GPU that reports zero fans (an H200 does) answers NotSupported, as
    asking fan 0 of it would only say InvalidArgument."""
    if pynvml.nvmlDeviceGetNumFans(handle) == 0:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    return pynvml.nvmlDeviceGetFanSpeed_v2(handle, 0)


def _field_or_raise(pynvml: Any, handle: Any, field: int) -> object:
    """One field value; raises its NVML error (a field answers in its own nvmlReturn)."""
    value = pynvml.nvmlDeviceGetFieldValues(handle, [field])[0]
    if value.nvmlReturn != 0:
        raise pynvml.NVMLError(value.nvmlReturn)
    return value


def _xid_register(pynvml: Any, handle: Any) -> None:
    """Register for XID events on a set of our own and free it (read-only: it changes no GPU setting)."""
    event_set = pynvml.nvmlEventSetCreate()
    try:
        pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_static_facts_read_again_on_a_real_gpu() -> None:
    """On real NVML, a GPU whose facts lack the range (as after a failed read at start) gets them read
    again at its next read: the same facts as at start, a new GpuInfo, and nothing written."""
    pytest.importorskip("pynvml")
    try:
        fresh = NvmlBackend(RealClock())
    except BackendUnavailable as exc:
        pytest.skip(f"no NVIDIA GPU: {exc}")
    try:
        first = fresh.gpus()[0]
        assert first.power_limit_min_w is not None and first.power_limit_max_w is not None
        st = fresh._states[0]
        st.info = replace(first, power_limit_min_w=None, power_limit_max_w=None)  # as a failed range read leaves it
        fresh._infos = (st.info, *fresh._infos[1:])
        st.info_due_s = 0.0
        fresh.read()
        again = fresh.gpus()[0]
        report("facts read again", before=(first.power_limit_min_w, first.power_limit_max_w),
               after=(again.power_limit_min_w, again.power_limit_max_w))  # fmt: skip
        assert again == first and again is not first
        assert st.info_due_s == float("inf")  # complete: not read again
    finally:
        fresh.close()


def test_power_range_read_again_on_a_real_gpu(backend: NvmlBackend) -> None:
    """On real NVML, the power-limit range and default read again (as every telemetry_refresh_s) are those read
    at open: the same GpuInfo objects are handed out, no change or refusal is logged, nothing is written."""
    first = backend.gpus()
    for st in backend._states:
        st.range_due_s = 0.0  # due now
    with capture_logs() as logs:
        backend.read()
    again = backend.gpus()
    report(
        "range read again", ranges=[(g.power_limit_min_w, g.power_limit_max_w, g.power_limit_default_w) for g in again]
    )
    assert again is first
    assert [e["event"] for e in logs if e["event"].startswith("nvml_power_range")] == []
    assert all(st.range_due_s > 0.0 for st in backend._states)  # next at the slow cadence
