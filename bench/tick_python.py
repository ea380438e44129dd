"""The governor's own Python per tick on one GPU, and the simulation loop's speed, this checkout against another.

``python3 bench/tick_python.py --tree OTHER [--rounds R] [--ticks N] [--sim-s S]`` runs, in
child processes that alternate between the two checkouts (each importing only its own):

- ``governor_python_us``: ``Daemon.tick()`` over the NVML backend on this checkout's
  ``tests/fake_pynvml.py`` (one idle GPU, no processes, dry run, per-process metrics on: the
  configuration of bench/gpu_overhead.py), minus the same NVML calls the floor of
  bench/nvml_floor.py makes, on the same fake, in the same loop: what is left is the
  governor's own Python (the adapter, the step, the report, the observers). CPU time
  (``time.process_time``), mean over N ticks after 300 of warm-up.
- ``sim_ticks_per_s``: ``run_policy`` (the call bench/sim_speed.py times) for S simulated
  seconds of the RTX 4070 seed scenario at 1 Hz, ticks per CPU second.

Prints JSON: per checkout the median and every round, and the ratios this / other. No GPU
is needed and none is touched.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from trees import run_child

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, tempfile, time
tree, kind, n, repo = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
sys.path.insert(0, tree)
from governor import logsetup
logsetup.configure("json", "error")
from governor.config import Config
if kind == "sim":
    from governor.sim.profiles import load_profile
    from governor.sim.scenario import load_scenario
    from governor.whatif.simulate import SimSetup, run_policy
    setup = SimSetup(load_profile("rtx4070"), load_scenario("sustained-inference"), n)
    t0 = time.process_time()
    run_policy(setup, Config(), "defaults", (75.0, 80.0, 85.0))
    print(json.dumps(n / (time.process_time() - t0)))
    raise SystemExit(0)
import importlib.util
from governor.backends.nvml import NvmlBackend
from governor.classes import VramPolicy
from governor.clock import VirtualClock
from governor.daemon import Daemon, VirtualWaiter
from governor.notify import Notifier
sys.path.insert(0, repo + "/bench")
from nvml_floor import raw_reads
spec = importlib.util.spec_from_file_location("fake_pynvml", repo + "/tests/fake_pynvml.py")
fake_module = sys.modules["fake_pynvml"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fake_module)
fake = fake_module.FakeNvml([fake_module.FakeGpu(uuid="GPU-00000000-0000-0000-0000-000000000000",
                                                 clock_event_reasons=0x4)])
clock = VirtualClock()
backend = NvmlBackend(clock, nvml=fake, proc_root=tempfile.mkdtemp())
handle = fake.nvmlDeviceGetHandleByIndex(0)
reads = [fn for _, fn in raw_reads(fake, handle)]
events = fake.nvmlEventSetCreate()
fake.nvmlDeviceRegisterEvents(handle, fake.nvmlEventTypeXidCriticalError, events)
def xid_wait():
    try:
        fake.nvmlEventSetWait_v2(events, 0)
    except fake.NVMLError:
        pass
reads.append(xid_wait)
with tempfile.TemporaryDirectory() as state:
    config = Config(dry_run=True, state_dir=state, runtime_dir="", vram=VramPolicy(per_process_metrics=True))
    daemon = Daemon(config, backend, clock, waiter=VirtualWaiter(clock), notifier=Notifier())
    daemon.start()
    floor_s = tick_s = 0.0
    for i in range(int(n) + 300):
        clock.advance(1.0)
        t0 = time.process_time()
        for read in reads:
            read()
        t1 = time.process_time()
        daemon.tick()
        t2 = time.process_time()
        if i >= 300:
            floor_s += t1 - t0
            tick_s += t2 - t1
    daemon.stop()
print(json.dumps((tick_s - floor_s) / n * 1e6))
"""


def child(tree: Path, kind: str, amount: float) -> float:
    """One child's figure: governor Python us per tick, or simulated ticks per CPU second."""
    return float(run_child(tree, CHILD, tree, kind, amount, REPO, what=f"the {kind} child"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", required=True, help="the other checkout (e.g. the code before a change)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating children per checkout and figure")
    parser.add_argument("--ticks", type=int, default=5000, help="timed ticks per governor-Python child")
    parser.add_argument("--sim-s", type=float, default=7200.0, help="simulated seconds per simulation child")
    args = parser.parse_args()
    trees = {"this": REPO, "other": Path(args.tree).resolve()}
    out: dict[str, Any] = {"rounds": args.rounds}
    for kind, figure, amount in (("nvml", "governor_python_us", args.ticks), ("sim", "sim_ticks_per_s", args.sim_s)):
        got: dict[str, list[float]] = {name: [] for name in trees}
        for round_ in range(args.rounds):
            order = list(trees.items()) if round_ % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                got[name].append(child(tree, kind, amount))
        medians = {name: statistics.median(values) for name, values in got.items()}
        out[figure] = {
            **{name: {"median": round(medians[name], 1), "all": [round(v, 1) for v in got[name]]} for name in trees},
            "ratio_this_over_other": round(medians["this"] / medians["other"], 3),
        }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
