"""Simulation speed: simulated hours through the whole daemon loop, per wall-clock second.

``python3 bench/sim_speed.py [--hours H] [--repeat N]`` runs the default config on the
simulated RTX 4070 (sustained-inference, seed 0) at 1 Hz through the real Daemon - read,
rules, actuator, publish, the what-if recorder - on a virtual clock, ``--repeat`` times
(default 3), then the whole ``gpu-governor simulate`` command once (which runs the
no-governor baseline too: two daemon runs). Prints a Markdown table: wall and CPU
seconds (best of the repeats), ticks per second, and the goal (<= 30 s for 24 h).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from governor.cli import main as cli_main
from governor.config import Config
from governor.sim.profiles import load_profile
from governor.sim.scenario import load_scenario
from governor.whatif.simulate import SimSetup, run_policy


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of calling ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours (default 24)")
    parser.add_argument("--repeat", type=int, default=3, help="daemon-loop runs, best kept (default 3)")
    args = parser.parse_args()
    duration_s = args.hours * 3600.0
    setup = SimSetup(load_profile("rtx4070"), load_scenario("sustained-inference"), duration_s)
    loops = [timed(lambda: run_policy(setup, Config(), "defaults", (75.0, 80.0, 85.0))) for _ in range(args.repeat)]
    wall, cpu = min(loops)
    argv = ["simulate", "--profile", "rtx4070", "--scenario", "sustained-inference", "--duration", f"{duration_s:g}s"]
    cmd_wall, cmd_cpu = timed(lambda: cli_main(argv, out=io.StringIO(), err=io.StringIO()))
    ticks = int(duration_s)
    print("| what | simulated | wall s | CPU s | ticks/s | goal |")
    print("|---|---|---|---|---|---|")
    print(
        f"| daemon loop, default config (best of {args.repeat}) | {args.hours:g} h at 1 Hz | {wall:.1f} | {cpu:.1f} "
        f"| {ticks / wall:,.0f} | <= 30 s: {'met' if wall <= 30.0 * args.hours / 24.0 else 'MISSED'} |"
    )
    print(
        f"| `gpu-governor simulate` (baseline + default: 2 runs) | 2 x {args.hours:g} h | {cmd_wall:.1f} "
        f"| {cmd_cpu:.1f} | {2 * ticks / cmd_wall:,.0f} | |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
