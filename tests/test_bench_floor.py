"""The NVML floor the overhead benchmarks divide by is exactly the reads the adapter makes per tick."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from governor.backends._nvml_probe import PER_TICK_FIELDS
from governor.backends.nvml import NvmlBackend
from governor.clock import VirtualClock
from tests.fake_pynvml import FakeGpu, FakeNvml

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _floor_module() -> Any:
    spec = importlib.util.spec_from_file_location("nvml_floor_under_test", BENCH / "nvml_floor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _Counting:
    """The fake NVML, counting every ``nvml*`` call by name while ``counts`` is not None."""

    def __init__(self, nvml: FakeNvml) -> None:
        self._nvml = nvml
        self.counts: Counter[str] | None = None

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._nvml, name)
        if not (callable(value) and name.startswith("nvml")):
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.counts is not None:
                self.counts[name] += 1
            return value(*args, **kwargs)

        return counted


def _per_tick_calls(tmp_path: Path) -> Counter[str]:
    """The NVML calls the adapter makes on every one of 40 ticks at 1 Hz (the ones it makes each tick)."""
    spy = _Counting(FakeNvml([FakeGpu(uuid="GPU-0", clock_event_reasons=0x4)]))
    clock = VirtualClock()
    backend = NvmlBackend(clock, nvml=spy, proc_root=tmp_path)
    for _ in range(5):
        clock.advance(1.0)
        backend.read()
    every: Counter[str] | None = None
    for _ in range(40):
        clock.advance(1.0)
        spy.counts = Counter()
        backend.read()
        every = spy.counts if every is None else every & spy.counts
    backend.close()
    assert every is not None
    return every


def test_the_floor_names_the_adapters_per_tick_fields() -> None:
    """bench/nvml_floor.py's floor lists the adapter's PER_TICK_FIELDS, no more and no fewer."""
    floor = _floor_module()
    names = [name for name, _ in floor.raw_reads(FakeNvml([FakeGpu(uuid="GPU-0")]), object())]
    assert names == list(PER_TICK_FIELDS)


def test_the_floor_makes_the_calls_the_adapter_makes_each_tick(tmp_path: Path) -> None:
    """The floor's NVML calls (and the XID wait) are, call for call, those the adapter makes on every tick at 1 Hz."""
    floor = _floor_module()
    spy = _Counting(FakeNvml([FakeGpu(uuid="GPU-0", clock_event_reasons=0x4)]))
    handle = spy.nvmlDeviceGetHandleByIndex(0)
    events = spy.nvmlEventSetCreate()
    spy.nvmlDeviceRegisterEvents(handle, spy.nvmlEventTypeXidCriticalError, events)
    reads: list[Callable[[], object]] = [fn for _, fn in floor.raw_reads(spy, handle)]
    reads.append(dict(floor.telemetry_reads(spy, handle, events))["xid_event_wait"])
    spy.counts = Counter()
    for read in reads:
        read()
    assert spy.counts == _per_tick_calls(tmp_path)


def test_the_power_range_is_read_at_the_slow_cadence(tmp_path: Path) -> None:
    """The power-limit range and default are read again every 10 s (4 times in 40 ticks at 1 Hz): slow reads,
    outside the per-tick floor."""
    spy = _Counting(FakeNvml([FakeGpu(uuid="GPU-0")]))
    clock = VirtualClock()
    backend = NvmlBackend(clock, nvml=spy, proc_root=tmp_path)
    spy.counts = Counter()
    for _ in range(40):
        clock.advance(1.0)
        backend.read()
    backend.close()
    ranges = ("nvmlDeviceGetPowerManagementLimitConstraints", "nvmlDeviceGetPowerManagementDefaultLimit")
    assert [spy.counts[name] for name in ranges] == [4, 4]
    assert not set(ranges) & set(_per_tick_calls(tmp_path))
