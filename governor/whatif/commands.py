"""The what-if commands behind ``gpu-governor calibrate | replay | simulate``.

Each takes the parsed arguments and the output streams and returns an exit code;
a problem is raised as :class:`governor.whatif.common.WhatIfError` (one line and a
code) or :class:`governor.config.ConfigError` (a config, profile or scenario).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import TextIO

from governor.backends.simulated import DEFAULT_SUBSTEP_S
from governor.sim.profiles import load_profile
from governor.sim.scenario import MAX_GPU_INDEX, load_scenario
from governor.trace import Trace, TraceError, read_trace
from governor.whatif.calibrate import check_fit, fit_gpus, render_calibration, write_profile
from governor.whatif.common import WhatIfError, load_policy_config, parse_duration, unique_labels
from governor.whatif.plot import plot_series, require_matplotlib
from governor.whatif.progress import Progress
from governor.whatif.replay import render_replay, replay_titles, replay_trace
from governor.whatif.simulate import SimSetup, compare, comparison_document, render_comparison

MAX_GPUS = MAX_GPU_INDEX + 1
"""The most GPUs a simulation has (``[simulation] gpu_count``'s bound)."""


def _trace(path: object, option: str = "") -> Trace:
    try:
        return read_trace(str(path))
    except TraceError as exc:
        raise WhatIfError(f"{option}{exc}") from None


def cmd_calibrate(args: argparse.Namespace, out: TextIO) -> int:
    """Fit each GPU of the trace, print the parameters and errors, optionally write a profile."""
    trace = _trace(args.trace)
    if args.output is not None and args.gpu is None and len([s for s in trace.samples.values() if s]) > 1:
        have = ", ".join(str(i) for i, s in sorted(trace.samples.items()) if s)
        raise WhatIfError(f"--output: {trace.source} holds GPUs {have}: choose the one to profile with --gpu N")
    other = _trace(args.check, "--check: ") if args.check is not None else None
    results = fit_gpus(trace, args.gpu)
    if other is not None:
        results = [replace(r, check=check_fit(r.fit, other, r.gpu_index)) for r in results]
    out.write(render_calibration(trace.source, results))
    if args.output is not None:
        name = write_profile(trace, results[0], args.output)
        out.write(
            f"\nwrote profile {name!r} to {args.output}; use it with "
            f"`gpu-governor simulate --profile {args.output} ...` or `gpu-governor run --simulate {args.output}`\n"
        )
    return 0


def cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    """Replay a trace through the rules; print the timeline and summary, optionally plot it."""
    if args.plot is not None:
        require_matplotlib()
    trace = _trace(args.trace)
    config = load_policy_config(args.config)
    result = replay_trace(trace, config)
    out.write(render_replay(result))
    if args.plot is not None and result.series:
        title = replay_titles(result)[0]
        plot_series(args.plot, title, result.series, result.series[0], show_target=True)
        out.write(f"wrote plot {args.plot}\n")
    return 0


def cmd_simulate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Simulate the config (and every --compare config) against no governor; print the table."""
    duration_s = parse_duration(args.duration)
    if duration_s < DEFAULT_SUBSTEP_S:  # no physics step would run: no energy, no work, no throughput
        raise WhatIfError(
            f"--duration: expected at least {DEFAULT_SUBSTEP_S:g} s (one step of the simulated physics), "
            f"got {args.duration}"
        )
    if args.plot is not None:
        require_matplotlib()
    if args.gpus is not None and not 1 <= args.gpus <= MAX_GPUS:
        raise WhatIfError(f"--gpus: expected 1 to {MAX_GPUS} (as [simulation] gpu_count), got {args.gpus}")
    profile = load_profile(args.profile)
    scenario = load_scenario(args.scenario)
    configs = [load_policy_config(args.config), *(load_policy_config(p) for p in args.compare or ())]
    labels = unique_labels(configs)
    needed = scenario.highest_gpu_index() + 1
    gpu_count = args.gpus if args.gpus is not None else max(1, needed)
    setup = SimSetup(profile, scenario, duration_s, seed=args.seed, gpu_count=gpu_count)
    try:
        comparison = compare(setup, configs, labels, Progress(err))
    except ValueError as exc:  # a scenario naming more GPUs than --gpus (a SimDataError is a ConfigError)
        raise WhatIfError(str(exc)) from None
    if getattr(args, "json", False):
        out.write(json.dumps(comparison_document(comparison), indent=2, allow_nan=False) + "\n")
    else:
        out.write(render_comparison(comparison))
    if args.plot is not None:
        primary = comparison.runs[0]
        series = [*primary.series, *(r.series[0] for r in comparison.runs[1:]), comparison.baseline.series[0]]
        title = (
            f"{profile.gpu_name} ({profile.name}), scenario {scenario.name}, seed {args.seed}: "
            + ", ".join(r.label for r in comparison.runs)
            + " vs no governor"
        )
        plot_series(args.plot, title, series, primary.series[0])
        out.write(f"wrote plot {args.plot}\n")
    return 0
