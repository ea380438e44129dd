"""The NVML floor against NvmlBackend.read(): what the adapter adds on top of the raw reads.

``python3 bench/nvml_floor.py [--iterations N] [--label TEXT]`` prints one JSON object:

- ``raw_us``: per GPU, p50/p99 microseconds of exactly the NVML reads NvmlBackend makes
  each tick (``governor.backends._nvml_probe.PER_TICK_FIELDS``: temperature V, power,
  enforced limit, memory v2, utilisation, clock event reasons, SM clock, compute and
  graphics processes v3), in a tight loop (a GPU in MIG mode adds the memory info and compute
  processes of each MIG instance: not measured, no GPU here runs MIG);
- ``per_read_us_p50``: the median of each of those reads alone (GPU 0);
- ``telemetry_us_p50``: the median of each telemetry read that is not per GPU and tick
  (GPU 0): the XID event wait with a zero timeout (once per tick for all GPUs), and the
  slow reads (violation counters, ECC counts, remapped rows, memory temperature through
  field values, memory clock, performance state, fan count, and the power-limit range and
  default limit, read again every 10 s), or the NVML error it answered;
- ``adapter_us_per_gpu``: p50/p99 of ``NvmlBackend.read()`` divided by the GPU count
  (the slow reads fall due once at the start, then every 10/30 s, so they barely show);
- ``ratio_p50``: adapter p50 per GPU over the mean raw p50 per GPU.

Read-only: it changes no GPU setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from governor.backends.nvml import NvmlBackend
from governor.clock import RealClock


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50 and p99 in microseconds."""
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered) / 1000.0, 2), "p99": round(p99 / 1000.0, 2)}


def raw_reads(nvml: Any, handle: Any) -> list[tuple[str, Callable[[], object]]]:
    """The per-tick reads NvmlBackend makes, bound to one handle, named as in
    ``PER_TICK_FIELDS`` (tests/test_bench_floor.py holds the two lists together)."""
    return [
        ("temperature", lambda: nvml.nvmlDeviceGetTemperatureV(handle, nvml.NVML_TEMPERATURE_GPU)),
        ("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle)),
        ("power_limit_enforced", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle)),
        ("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)),
        ("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle)),
        ("clock_event_reasons", lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle)),
        ("sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
        ("compute_processes", lambda: nvml.nvmlDeviceGetComputeRunningProcesses_v3(handle)),
        ("graphics_processes", lambda: nvml.nvmlDeviceGetGraphicsRunningProcesses_v3(handle)),
    ]


def telemetry_reads(nvml: Any, handle: Any, event_set: Any) -> list[tuple[str, Callable[[], object]]]:
    """The telemetry reads NvmlBackend makes on their own cadence, and the per-tick XID event wait."""

    def wait() -> object:
        try:
            return nvml.nvmlEventSetWait_v2(event_set, 0)
        except nvml.NVMLError as exc:  # Timeout: no event pending, the usual answer
            if exc.value != nvml.NVML_ERROR_TIMEOUT:
                raise
            return None

    def call(fn: Callable[..., object], *args: object) -> Callable[[], object]:
        return lambda: fn(handle, *args)

    reads: list[tuple[str, Callable[[], object]]] = [("xid_event_wait", wait)]
    for name, policy in (("violation_power", nvml.NVML_PERF_POLICY_POWER), ("violation_sync_boost", 2)):
        reads.append((name, call(nvml.nvmlDeviceGetViolationStatus, policy)))
    for kind in (0, 1):  # corrected, uncorrected
        for scope in (0, 1):  # volatile, aggregate
            reads.append((f"ecc_{kind}_{scope}", call(nvml.nvmlDeviceGetTotalEccErrors, kind, scope)))
    reads += [
        ("remapped_rows", lambda: nvml.nvmlDeviceGetRemappedRows(handle)),
        ("memory_temperature_field", lambda: nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_MEMORY_TEMP])),
        ("memory_clock", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),
        ("pstate", lambda: nvml.nvmlDeviceGetPerformanceState(handle)),
        ("fan_count", lambda: nvml.nvmlDeviceGetNumFans(handle)),
        ("power_limit_constraints", lambda: nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)),
        ("power_limit_default", lambda: nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)),
    ]
    return reads


def time_each(reads: list[tuple[str, Callable[[], object]]], n: int) -> dict[str, float | str]:
    """The median microseconds of each read alone, or the NVML error it answered."""
    out: dict[str, float | str] = {}
    for label, fn in reads:
        samples = []
        try:
            for _ in range(n):
                t0 = time.perf_counter_ns()
                fn()
                samples.append(time.perf_counter_ns() - t0)
        except Exception as exc:  # an NVML error is the answer for that read
            out[label] = f"{type(exc).__name__}: {exc}"
            continue
        out[label] = percentiles(samples)["p50"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--label", default=None, help="free text copied into the output")
    args = parser.parse_args(argv)

    import pynvml as nvml

    nvml.nvmlInit()
    try:
        count = nvml.nvmlDeviceGetCount()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        names = [nvml.nvmlDeviceGetName(h) for h in handles]
        driver = nvml.nvmlSystemGetDriverVersion()
        perf = time.perf_counter_ns

        raw: dict[str, dict[str, float]] = {}
        for index, handle in enumerate(handles):
            reads = [fn for _, fn in raw_reads(nvml, handle)]
            for _ in range(args.warmup):
                for fn in reads:
                    fn()
            samples = []
            for _ in range(args.iterations):
                t0 = perf()
                for fn in reads:
                    fn()
                samples.append(perf() - t0)
            raw[str(index)] = percentiles(samples)

        per_read: dict[str, float] = {}
        for label, fn in raw_reads(nvml, handles[0]):
            one = []
            for _ in range(max(200, args.iterations // 4)):
                t0 = perf()
                fn()
                one.append(perf() - t0)
            per_read[label] = percentiles(one)["p50"]

        event_set = nvml.nvmlEventSetCreate()
        for handle in handles:  # read-only: asks NVML to report XID errors to this process
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
            except nvml.NVMLError as exc:
                print(f"XID events not available: {exc}", file=sys.stderr)
        telemetry = time_each(telemetry_reads(nvml, handles[0], event_set), 50)
        nvml.nvmlEventSetFree(event_set)
    finally:
        nvml.nvmlShutdown()

    backend = NvmlBackend(RealClock())
    try:
        for _ in range(args.warmup):
            backend.read()
        per_gpu = []
        processes = 0
        for _ in range(args.iterations):
            t0 = time.perf_counter_ns()
            snapshot = backend.read()
            per_gpu.append((time.perf_counter_ns() - t0) // len(snapshot.gpus))
        processes = sum(len(r.processes or ()) for r in snapshot.gpus)
        health = [r.health.value for r in snapshot.gpus]
    finally:
        backend.close()

    adapter = percentiles(per_gpu)
    raw_p50 = statistics.mean(v["p50"] for v in raw.values())
    print(
        json.dumps(
            {
                "label": args.label,
                "device": names[0] if names else None,
                "driver": driver,
                "gpus": count,
                "iterations": args.iterations,
                "processes_seen": processes,
                "health": health,
                "raw_us": raw,
                "per_read_us_p50": per_read,
                "telemetry_us_p50": telemetry,
                "adapter_us_per_gpu": adapter,
                "ratio_p50": round(adapter["p50"] / raw_p50, 2) if raw_p50 else None,
                "overhead_us_p50": round(adapter["p50"] - raw_p50, 2),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
