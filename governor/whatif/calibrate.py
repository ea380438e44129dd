"""Fit the simulator's thermal model to a recorded trace, check it on another, write a profile.

The fit is :func:`governor.sim.calibrate.fit_thermal` (output error: the model driven by
the recorded power reproduces the recorded temperatures with the least RMSE). A check
predicts another trace's temperatures from that trace's own power series, started at its
first measured temperature: how well the model predicts data it was not fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from governor.safefile import write_atomic
from governor.sim.calibrate import FitResult, fit_thermal, predict, profile_from_trace, rmse, samples_from_trace
from governor.sim.profiles import render_profile
from governor.sim.thermal import steady_temperature_c
from governor.trace import Trace
from governor.whatif.common import WhatIfError


@dataclass(frozen=True, slots=True)
class Check:
    """A fit judged on another trace: RMSE in C over ``n`` samples of ``source``."""

    source: str
    rmse_c: float
    n: int


@dataclass(frozen=True, slots=True)
class GpuCalibration:
    """The fit of one GPU of a trace and, when asked, its check on another trace."""

    gpu_index: int
    name: str
    power_limit_default_w: float | None
    fit: FitResult
    check: Check | None = None


def fit_gpus(trace: Trace, gpu_index: int | None = None) -> list[GpuCalibration]:
    """Fit every GPU of ``trace`` that has samples (only ``gpu_index`` when given).

    WhatIfError when the GPU is not in the trace or its samples cannot be fitted.
    """
    indexes = sorted(i for i, samples in trace.samples.items() if samples)
    if gpu_index is not None:
        if gpu_index not in indexes:
            have = ", ".join(str(i) for i in indexes) or "none"
            raise WhatIfError(f"--gpu: {trace.source} has no samples of GPU {gpu_index} (GPUs with samples: {have})")
        indexes = [gpu_index]
    if not indexes:
        raise WhatIfError(f"{trace.source}: no samples to fit")
    out = []
    for i in indexes:
        info = trace.devices[i].info
        try:
            fit = fit_thermal(samples_from_trace(trace, i))
        except ValueError as exc:
            raise WhatIfError(f"{trace.source}: GPU {i}: {exc}") from None
        out.append(GpuCalibration(i, info.name, info.power_limit_default_w, fit))
    return out


def check_fit(fit: FitResult, other: Trace, gpu_index: int) -> Check:
    """Predict ``other``'s GPU ``gpu_index`` temperatures from its power alone with ``fit``."""
    try:
        samples = samples_from_trace(other, gpu_index)
    except ValueError:
        raise WhatIfError(f"--check: {other.source} has no samples of GPU {gpu_index}") from None
    if len(samples) < 2:
        raise WhatIfError(f"--check: {other.source}: GPU {gpu_index} has fewer than 2 usable samples")
    measured = [s.temperature_c for s in samples]
    predicted = predict(fit.params, [s.t_s for s in samples], [s.power_w for s in samples], measured[0], fit.ambient_c)
    return Check(other.source, rmse(predicted, measured), len(samples))


def render_calibration(source: str, results: list[GpuCalibration]) -> str:
    """The fitted parameters, fit RMSE and check RMSE of every GPU, as text."""
    lines = [f"calibrate: {source}"]
    for r in results:
        p = r.fit.params
        lines += [
            "",
            f"gpu{r.gpu_index} ({r.name}):",
            f"  r_die_c_per_w    {p.r_die_c_per_w:.5f} C/W    c_die_j_per_c  {p.c_die_j_per_c:9.2f} J/C"
            f"   (tau_die  {p.tau_die_s:7.2f} s)",
            f"  r_sink_c_per_w   {p.r_sink_c_per_w:.5f} C/W    c_sink_j_per_c {p.c_sink_j_per_c:9.2f} J/C"
            f"   (tau_sink {p.tau_sink_s:7.2f} s)",
            f"  r_total          {p.r_total_c_per_w:.5f} C/W    ambient_c      {r.fit.ambient_c:9.2f} C",
        ]
        if r.power_limit_default_w:
            settle = steady_temperature_c(p, r.power_limit_default_w, r.fit.ambient_c)
            lines.append(f"  a sustained {r.power_limit_default_w:g} W (the default limit) settles at {settle:.1f} C")
        lines.append(f"  fit RMSE {r.fit.rmse_c:.3f} C over {r.fit.n} samples")
        if r.check is not None:
            lines.append(
                f"  check RMSE {r.check.rmse_c:.3f} C over {r.check.n} samples of {r.check.source} "
                "(predicted from its power alone, from its first temperature)"
            )
    return "\n".join(lines) + "\n"


def write_profile(trace: Trace, result: GpuCalibration, path: Path) -> str:
    """Write the profile of ``result``'s GPU (facts from ``trace``, thermal constants from the fit)
    to ``path`` (a new file, mode 0644, renamed over it: a planted symlink is replaced, never
    followed); returns the profile's name (the file's stem)."""
    name = path.stem or "calibrated"
    try:
        profile = profile_from_trace(trace, result.fit, name, result.gpu_index)
    except ValueError as exc:
        raise WhatIfError(f"--output: {exc}") from None
    comment = (
        f"Calibrated by gpu-governor calibrate from {trace.source} (GPU {result.gpu_index}, {result.name}).\n"
        f"Fit RMSE {result.fit.rmse_c:.3f} C over {result.fit.n} samples."
    )
    if result.check is not None:
        comment += f"\nCheck RMSE {result.check.rmse_c:.3f} C over {result.check.n} samples of {result.check.source}."
    try:  # a new file renamed over the path: a symlink planted there is replaced, never followed
        write_atomic(path, render_profile(profile, comment).encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise WhatIfError(f"--output: cannot write {path}: {exc.strerror or exc}") from None
    return name
