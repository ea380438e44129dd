"""Fan assist against the power ladder alone: the seed's sustained inference and the hot scenario.

``python3 bench/fan_assist.py [--hours H] [--seed N]`` simulates an RTX 4070 (profile
``rtx4070``, its ``[fan]`` model) for ``--hours`` (default 24) of each scenario under
``config/examples/rtx4070-fan.toml`` twice - as shipped (fan assist, 75 % ceiling) and
with ``[fan] mode = "auto"`` (the power ladder alone, the card's own fan control) -
through the real daemon loop, and prints a Markdown table: seconds above 75 C, peak die
temperature, work done (full-speed seconds), mean and peak fan speed, the lowest power
limit reached.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from governor.config import load_config
from governor.policy import FanPolicy
from governor.sim.profiles import load_profile
from governor.sim.scenario import load_scenario
from governor.whatif.fanbench import FanOutcome, render_table, run_fan_policy

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "examples" / "rtx4070-fan.toml"


def main() -> int:
    """Run both policies on both scenarios and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours per run (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="power noise seed (default 0)")
    args = parser.parse_args()
    profile = load_profile("rtx4070")
    assist = load_config(EXAMPLE, enforce_trust=False)
    power_only = replace(assist, fan=FanPolicy())
    rows: list[tuple[str, FanOutcome]] = []
    began = time.monotonic()
    for name in ("sustained-inference", "hot"):
        scenario = load_scenario(name)
        for label, config in (("power only", power_only), ("fan assist", assist)):
            rows.append((name, run_fan_policy(profile, scenario, config, label, args.hours * 3600.0, seed=args.seed)))
    print(render_table(rows))
    print()
    for name in ("sustained-inference", "hot"):
        power, fan = (o for scenario, o in rows if scenario == name)
        print(
            f"{name}: fan assist does {100.0 * (fan.work_s / power.work_s - 1.0):+.2f} % work, "
            f"{fan.seconds_above - power.seconds_above:+.0f} s above 75 C"
        )
    print(f"({args.hours:g} simulated hours per run, seed {args.seed}, {time.monotonic() - began:.1f} s wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
