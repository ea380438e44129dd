"""The governor's tick, this checkout against another, side by side: simulated GPUs and a fake NVML.

``python3 bench/tick_compare.py --tree OTHER [--ticks N] [--rounds R] [--gpus G]`` runs, in
alternating child processes (each importing only its own checkout), ``Daemon.tick()`` on
a virtual clock advancing 1 s per tick, over two backends:

- ``simulated``: G simulated H100s under a power-capped load (the simulator's physics
  included);
- ``fake_nvml``: the NVML backend over THIS checkout's ``tests/fake_pynvml.py`` (the same
  stubs for both checkouts; an older checkout simply does not call the newer functions)
  with G GPUs: every NVML call is a Python stub of a few microseconds, so this measures
  the adapter's own Python cost plus a stub per NVML call it makes (with the telemetry:
  the extra per-tick reads, the XID poll and, every 10 s, the slow reads).

It prints JSON: per backend and checkout the p50/p99 and mean microseconds of CPU time
(the tick thread's own, so other processes on a busy machine do not count) per GPU per
tick, and ``ratio_p50`` / ``ratio_mean`` = this checkout / the other (the goal of issue
14: <= 1.10). ``best_p50`` is the lowest median of any 500 consecutive ticks, and
``ratio_best_p50`` their ratio: the figure least moved by other work on a busy machine
(interference only ever adds time). The mean includes the slow reads (every 10, 30 and
60 ticks). Each child
warms up first; rounds alternate the checkouts so a drift of the machine hits both.
No GPU is needed and none is touched.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from trees import run_child

REPO = Path(__file__).resolve().parents[1]
CHUNK = 500  # ticks per chunk whose median is a candidate for best_p50

CHILD = r"""
import json, sys, tempfile, time
tree, kind, ticks, gpus, fake_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, tree)
from governor import logsetup
logsetup.configure("json", "error")
from governor.clock import VirtualClock
from governor.config import Config
from governor.daemon import Daemon, VirtualWaiter
from governor.notify import Notifier

clock = VirtualClock()
if kind == "simulated":
    from governor.backends.simulated import SimulatedBackend
    from governor.sim import load_profile
    from governor.sim.scenario import parse_scenario
    scenario = parse_scenario({"name": "b", "repeat": False, "power_noise_w": 1.0,
        "phase": [{"duration_s": 1e6, "demand_fraction": 1.2}], "process": [{"name": "w", "memory_gib": 4.0}]}, "<b>")
    backend = SimulatedBackend(load_profile("h100-80gb"), scenario, clock, gpu_count=gpus)
else:
    import importlib.util
    from governor.backends.nvml import NvmlBackend
    spec = importlib.util.spec_from_file_location("fake_pynvml", fake_path)
    fake_module = sys.modules["fake_pynvml"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_module)
    FakeGpu, FakeNvml = fake_module.FakeGpu, fake_module.FakeNvml
    fake = FakeNvml([FakeGpu(uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000", clock_event_reasons=0x4,
                             compute=[(4_000_000 + i, 4 << 30)]) for i in range(gpus)])
    backend = NvmlBackend(clock, nvml=fake, proc_root=tempfile.mkdtemp())
with tempfile.TemporaryDirectory() as state:
    daemon = Daemon(Config(dry_run=True, state_dir=state, runtime_dir=""), backend, clock,
                    waiter=VirtualWaiter(clock), notifier=Notifier())
    daemon.start()
    samples = []
    for i in range(ticks + 200):
        clock.advance(1.0)
        t0 = time.thread_time_ns()
        daemon.tick()
        t1 = time.thread_time_ns()
        if i >= 200:
            samples.append((t1 - t0) / gpus / 1000)
    daemon.stop()
print(json.dumps(samples))
"""


def pct(samples: list[float]) -> dict[str, float]:
    """p50 and p99 of ``samples``."""
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 2),
        "mean": round(statistics.fmean(ordered), 2),
    }


def child(tree: Path, kind: str, ticks: int, gpus: int) -> list[float]:
    """One child's tick samples (us per GPU)."""
    fake = REPO / "tests" / "fake_pynvml.py"
    return [float(s) for s in run_child(tree, CHILD, tree, kind, ticks, gpus, fake, what=f"the {kind} child")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", required=True, help="the other checkout (e.g. the code before a change)")
    parser.add_argument("--ticks", type=int, default=3000, help="ticks per child")
    parser.add_argument("--rounds", type=int, default=3, help="alternating children per checkout and backend")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per backend")
    args = parser.parse_args()
    trees = {"this": REPO, "other": Path(args.tree).resolve()}
    out: dict[str, Any] = {"gpus": args.gpus, "ticks": args.ticks * args.rounds}
    for kind in ("simulated", "fake_nvml"):
        samples: dict[str, list[float]] = {name: [] for name in trees}
        best: dict[str, float] = {name: float("inf") for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                got = child(tree, kind, args.ticks, args.gpus)
                samples[name] += got
                for start in range(0, len(got) - CHUNK + 1, CHUNK):
                    best[name] = min(best[name], statistics.median(got[start : start + CHUNK]))
        stats = {name: pct(s) for name, s in samples.items()}
        out[kind] = {
            **{f"{name}_us_per_gpu": {**stat, "best_p50": round(best[name], 2)} for name, stat in stats.items()},
            "ratio_p50": round(stats["this"]["p50"] / stats["other"]["p50"], 3),
            "ratio_mean": round(stats["this"]["mean"] / stats["other"]["mean"], 3),
            "ratio_best_p50": round(best["this"] / best["other"], 3),
        }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
