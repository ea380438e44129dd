"""Replay recorded readings through target mode's online thermal fit (offline, read-only).

The fit is :func:`governor.rules.fit.replay`: the very code the governor runs each tick, so the
60-s-ahead prediction errors it returns are the ones the governor's metric would have shown.
Two inputs, both with time (s), die temperature (C) and board power (W) per GPU:

* a trace (``gpu-governor record``, ``docs/trace-format.md``), e.g. ``tests/data/h100-load.jsonl``;
* the ``summary.json`` of ``bench/gpu_target_dry_run.py``, whose ``raw`` key holds the
  per-second samples it recorded (:func:`raw_record` writes it; :func:`read_samples` reads it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from governor.errors import TraceError, WhatIfError
from governor.rules.fit import Replay, replay
from governor.trace import Trace, read_text, read_trace

Sample = tuple[float, float | None, float | None]
"""One reading: time (s), die temperature (C) or None, board power (W) or None."""


@dataclass(frozen=True, slots=True)
class GpuSamples:
    """One GPU's readings and the default power limit (W) the fit's prior is scaled by."""

    gpu: int
    name: str
    power_limit_default_w: float
    samples: tuple[Sample, ...]


def samples_from_trace(trace: Trace, default_w: float | None = None) -> list[GpuSamples]:
    """Every GPU of ``trace`` with a default limit (``default_w`` overrides it, W)."""
    out = []
    for gpu, device in sorted(trace.devices.items()):
        info = device.info
        limit = default_w if default_w is not None else (info.power_limit_default_w or info.power_limit_max_w)
        if limit is None or not limit > 0:
            raise WhatIfError(f"{trace.source}: GPU {gpu}: no default power limit; pass one (W)")
        rows = tuple((s.t_s, s.reading.temperature_c, s.reading.power_w) for s in trace.samples.get(gpu, ()))
        out.append(GpuSamples(gpu, info.name, limit, rows))
    return out


def raw_record(trace: Trace) -> dict[str, Any]:
    """The ``raw`` key of the dry run's summary: per GPU its index, name, default limit (W) and
    every sample's ``t`` (s), ``temperature_c`` (C) and ``power_w`` (W)."""
    gpus = []
    for gpu, device in sorted(trace.devices.items()):
        info = device.info
        gpus.append(
            {
                "gpu": gpu,
                "name": info.name,
                "power_limit_default_w": info.power_limit_default_w or info.power_limit_max_w,
                "samples": [
                    {"t": s.t_s, "temperature_c": s.reading.temperature_c, "power_w": s.reading.power_w}
                    for s in trace.samples.get(gpu, ())
                ],
            }
        )
    return {"gpus": gpus}


def _number(value: object, where: str, *, optional: bool = False, positive: bool = False) -> float | None:
    """``value`` as a finite float (None allowed when ``optional``); WhatIfError naming ``where`` otherwise."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WhatIfError(f"{where}: expected a finite number{' or null' if optional else ''}, got {value!r}")
    if positive and not value > 0:
        raise WhatIfError(f"{where}: expected a number > 0, got {value!r}")
    return float(value)


def samples_from_raw(raw: object, source: str, default_w: float | None = None) -> list[GpuSamples]:
    """The GPUs of a dry run's ``raw`` record (``source`` names it in errors); ``default_w`` (W)
    overrides each GPU's default limit."""
    if not isinstance(raw, dict) or not isinstance(raw.get("gpus"), list):
        raise WhatIfError(f"{source}: key 'raw.gpus': expected a list of GPUs")
    out = []
    for i, entry in enumerate(raw["gpus"]):
        where = f"{source}: raw.gpus[{i}]"
        if not isinstance(entry, dict):
            raise WhatIfError(f"{where}: expected an object")
        gpu = entry.get("gpu")
        if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
            raise WhatIfError(f"{where}.gpu: expected a GPU index (an integer >= 0), got {gpu!r}")
        limit = default_w
        if limit is None:
            limit = _number(entry.get("power_limit_default_w"), f"{where}.power_limit_default_w", positive=True)
        samples = entry.get("samples")
        if not isinstance(samples, list):
            raise WhatIfError(f"{where}.samples: expected a list of samples")
        rows: list[Sample] = []
        for k, sample in enumerate(samples):
            at = f"{where}.samples[{k}]"
            if not isinstance(sample, dict):
                raise WhatIfError(f"{at}: expected an object with t, temperature_c and power_w")
            t = _number(sample.get("t"), f"{at}.t")
            assert t is not None
            if rows and t < rows[-1][0]:
                raise WhatIfError(f"{at}.t: samples must be in time order ({t} after {rows[-1][0]})")
            rows.append(
                (
                    t,
                    _number(sample.get("temperature_c"), f"{at}.temperature_c", optional=True),
                    _number(sample.get("power_w"), f"{at}.power_w", optional=True),
                )
            )
        assert limit is not None
        out.append(GpuSamples(gpu, str(entry.get("name") or f"GPU {gpu}"), limit, tuple(rows)))
    return out


def read_samples(path: Path | str, default_w: float | None = None) -> list[GpuSamples]:
    """The GPUs recorded in ``path``: a dry run's summary (a JSON object with a ``raw`` key) or a
    trace (JSON Lines). Raises WhatIfError or TraceError naming the file and the key."""
    path = Path(path)
    try:
        text = read_text(path)  # bounded: a FIFO, a device or a huge file is refused unread
    except TraceError as exc:
        raise WhatIfError(str(exc)) from None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, or more digits or nesting than Python reads
        document = None  # not one JSON document: a trace (JSON Lines) or garbage, read_trace says which
    if isinstance(document, dict) and document.get("record") is None:
        if "raw" not in document:
            raise WhatIfError(f"{path}: key 'raw': missing (a dry run's summary.json records its samples there)")
        return samples_from_raw(document["raw"], str(path), default_w)
    try:
        return samples_from_trace(read_trace(path), default_w)
    except TraceError as exc:
        raise WhatIfError(str(exc)) from None


def replay_all(gpus: Sequence[GpuSamples]) -> list[tuple[GpuSamples, Replay]]:
    """Each GPU's readings through the fit."""
    return [(g, replay(g.samples, g.power_limit_default_w)) for g in gpus]


def _c(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} C"


def report(results: Sequence[tuple[GpuSamples, Replay]]) -> str:
    """One paragraph per GPU: the 60-s-ahead errors (mean abs, RMS, max), the room's range once
    the fit was ready, and the model at the end."""
    lines = []
    for gpu, result in results:
        lines.append(
            f"GPU {gpu.gpu} ({gpu.name}), {len(gpu.samples)} samples, default limit {gpu.power_limit_default_w:g} W"
        )
        lines.append(
            f"  60-s-ahead prediction error, {len(result.errors_c)} blocks: mean abs {_c(result.mean_abs_c)}, "
            f"RMS {_c(result.rms_c)}, max {_c(result.max_abs_c)}"
        )
        if result.rooms_c:
            lines.append(f"  room once ready: {min(result.rooms_c):.1f} to {max(result.rooms_c):.1f} C")
        model = result.final.params
        if model is not None:
            source = (
                "prior" if result.final.fitted is None else "fitted" if result.final.ready else "fitted, not yet ready,"
            )
            lines.append(
                f"  {source} model at the end: {model.r_total_c_per_w:.4f} C/W (die {model.r_die_c_per_w:.4f}), "
                f"tau {model.tau_s:.1f} s, room {model.ambient_c:.1f} C"
            )
    return "\n".join(lines)


def summary(results: Sequence[tuple[GpuSamples, Replay]]) -> list[dict[str, Any]]:
    """The same as JSON: per GPU the error statistics (C), the room's range (C) and the final model."""
    out = []
    for gpu, result in results:
        model = result.final.params
        out.append(
            {
                "gpu": gpu.gpu,
                "samples": len(gpu.samples),
                "prediction_error_samples": len(result.errors_c),
                "prediction_error_mean_abs_c": result.mean_abs_c,
                "prediction_error_rms_c": result.rms_c,
                "prediction_error_max_abs_c": result.max_abs_c,
                "room_min_c": min(result.rooms_c, default=None),
                "room_max_c": max(result.rooms_c, default=None),
                "model": None
                if model is None
                else {
                    "tau_s": model.tau_s,
                    "r_die_c_per_w": model.r_die_c_per_w,
                    "r_sink_c_per_w": model.r_sink_c_per_w,
                    "ambient_c": model.ambient_c,
                },
            }
        )
    return out
