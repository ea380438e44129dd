"""Record every GPU's readings to a trace file (``gpu-governor record``).

The file is the trace format of :mod:`governor.trace` (``docs/trace-format.md``): one
``device`` record per GPU, then one ``sample`` record per GPU per tick, ``t`` in seconds
since the first sample, in the backend's own time (``Snapshot.t_s``): real seconds for
NVML, simulated seconds for the simulated backend, whatever its time scale.
Each tick is flushed, so a killed recorder loses at most one line. Ticks are scheduled
on a fixed grid (``start + k * interval_s``): a slow read does not make the recording
drift, and a tick missed entirely is skipped, not bunched.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from governor.backends import Backend
from governor.clock import Clock
from governor.safefile import open_output
from governor.trace import device_record, sample_record, write_records

__all__ = ["ScaledClock", "record", "run_record"]


class ScaledClock:
    """``base`` running ``scale`` times faster: the time of a simulated backend whose
    ``time_scale`` is ``scale``, so a recorder schedules its ticks in simulated seconds."""

    def __init__(self, base: Clock, scale: float = 1.0) -> None:
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale: expected a number > 0, got {scale!r}")
        self._base = base
        self._scale = scale
        self._origin_s = base.monotonic()

    def monotonic(self) -> float:
        """Scaled seconds since this clock was made."""
        return (self._base.monotonic() - self._origin_s) * self._scale

    def wall(self) -> float:
        """The base clock's Unix seconds (not scaled)."""
        return self._base.wall()


def record(
    backend: Backend,
    output: IO[str] | Path | str,
    interval_s: float,
    duration_s: float | None,
    clock: Clock,
    sleep: Callable[[float], object] | None = None,
    stop_event: threading.Event | None = None,
    profile: str | None = None,
) -> int:
    """Sample ``backend`` every ``interval_s`` seconds into ``output``; return the sample records written.

    ``output`` is an open text stream or a path (created or truncated). ``duration_s``
    is how long to record (ticks at ``k * interval_s < duration_s``; at least one tick);
    ``None`` records until ``stop_event`` is set or KeyboardInterrupt. ``clock`` schedules
    the ticks and must run at the rate of the backend's snapshot time (a
    :class:`ScaledClock` for a simulated backend with a time scale); each sample's ``t``
    is its snapshot's ``t_s`` minus the first one's. ``sleep`` waits between ticks
    (default: ``stop_event.wait`` when an event is given, so setting it ends the wait,
    else :func:`time.sleep`); tests pass ``VirtualClock.advance``. The count is of
    ``sample`` lines, one per GPU per tick.
    """
    if not (interval_s > 0 and math.isfinite(interval_s)):
        raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
    if duration_s is not None and not duration_s >= 0:
        raise ValueError(f"duration_s must be >= 0 seconds or None, got {duration_s!r}")
    if isinstance(output, (str, Path)):
        with os.fdopen(open_output(output), "w", encoding="utf-8") as handle:  # never through a planted link
            return _record(backend, handle, interval_s, duration_s, clock, sleep, stop_event, profile)
    return _record(backend, output, interval_s, duration_s, clock, sleep, stop_event, profile)


def _record(
    backend: Backend,
    out: IO[str],
    interval_s: float,
    duration_s: float | None,
    clock: Clock,
    sleep: Callable[[float], object] | None,
    stop_event: threading.Event | None,
    profile: str | None,
) -> int:
    wait: Callable[[float], object]
    if sleep is not None:
        wait = sleep
    elif stop_event is not None:
        wait = stop_event.wait
    else:
        wait = time.sleep
    count = 0
    try:
        start_s = clock.monotonic()
        described: set[int] = set()  # GPU indexes with a device record
        _describe(backend, out, described, interval_s, profile)
        tick = 0
        origin_s: float | None = None
        while stop_event is None or not stop_event.is_set():
            snapshot = backend.read()
            if origin_s is None:
                origin_s = snapshot.t_s
            if any(r.index not in described for r in snapshot.gpus):  # a GPU found since (hot-plug)
                _describe(backend, out, described, interval_s, profile)
            t_s = max(0.0, snapshot.t_s - origin_s)
            write_records(out, [sample_record(t_s, r, r.sm_clock_mhz) for r in snapshot.gpus])
            count += len(snapshot.gpus)
            now_s = clock.monotonic()
            tick = max(tick + 1, math.floor((now_s - start_s) / interval_s) + 1)
            if duration_s is not None and tick * interval_s >= duration_s:
                break
            delay_s = start_s + tick * interval_s - now_s
            if delay_s > 0:
                wait(delay_s)
                if duration_s is not None and clock.monotonic() - start_s >= duration_s:
                    break  # the wait overshot the end
    except KeyboardInterrupt:
        pass
    return count


def _describe(backend: Backend, out: IO[str], described: set[int], interval_s: float, profile: str | None) -> None:
    """Write the device record of each GPU of the backend not described yet (each before its samples)."""
    new = [info for info in backend.gpus() if info.index not in described]
    write_records(out, (device_record(info, interval_s, profile) for info in new))
    described.update(info.index for info in new)


def run_record(
    backend: Backend,
    path: Path | str,
    interval_s: float,
    duration_s: float | None,
    clock: Clock,
    stop_event: threading.Event | None = None,
    sleep: Callable[[float], object] | None = None,
    profile: str | None = None,
) -> int:
    """Record to the file at ``path`` (the ``gpu-governor record`` command); return the samples written.

    Stops after ``duration_s`` seconds (``None``: never), when ``stop_event`` is set, or
    on KeyboardInterrupt (Ctrl-C), with every tick already on disk. ``sleep`` waits
    ``clock`` seconds (see :func:`record`); ``profile`` names the simulated profile in the
    device records.
    """
    return record(backend, path, interval_s, duration_s, clock, sleep, stop_event, profile)
