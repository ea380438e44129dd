"""Target mode against no governor, the naive rule and the default ladder: the scenario matrix.

``python3 bench/target_matrix.py [--hours H] [--seed N] [--write] [--plot FILE.png]``
runs each scenario of the matrix through the real daemon loop (``governor.whatif.simulate``,
virtual clock) under each policy and prints one Markdown table and the goals of issue 16.
``--write`` puts the table between the ``target-matrix`` markers of BENCHMARKS.md; ``--plot``
draws throughput against seconds above the scenario's ceiling, one panel per scenario
(matplotlib, a bench-only dependency).

Policies: no governor; the naive seed rule (``bench/naive-rule.toml``: 180 W at >= 75 C,
200 W at <= 65 C every tick; as percentages of the card's default limit on a card it
would deep-cap); the default ladder (built-in defaults); target mode
(``config/examples/rtx4070-target.toml`` with ``target_c`` at the scenario's ceiling). The
node-budget scenario runs every governed policy under ``[node] power_budget_w = 300`` and
adds target mode under a static equal split (``share = "weight"``), the budget's yardstick.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from governor.config import Config, load_config  # noqa: E402
from governor.sim.profiles import load_profile  # noqa: E402
from governor.sim.scenario import load_scenario  # noqa: E402
from governor.whatif.simulate import HOUR_S, SimSetup, compare, policy_document  # noqa: E402

NAIVE = ROOT / "bench" / "naive-rule.toml"
TARGET = ROOT / "config" / "examples" / "rtx4070-target.toml"
BUDGET = ROOT / "config" / "examples" / "workstation-node-budget.toml"
BENCHMARKS = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- target-matrix:begin -->", "<!-- target-matrix:end -->"


@dataclass(frozen=True)
class Case:
    """One row group of the matrix: a scenario on a profile, its ceiling (C), its GPUs."""

    label: str
    profile: str
    scenario: str
    ceiling_c: float
    gpus: int = 1
    budget_w: float | None = None


CASES = (
    Case("seed: sustained inference", "rtx4070", "sustained-inference", 75.0),
    Case("hot", "rtx4070", "hot", 80.0),
    Case("dual inference + game", "rtx4070", "dual-inference-game", 80.0),
    Case("heat-wave day", "rtx4070", "heat-wave-day", 80.0),
    Case("H100 training, hot hall", "h100-80gb", "hot-hall-training", 80.0),
    Case("two GPUs, 300 W node budget", "rtx4070", "node-budget-pair", 80.0, gpus=2, budget_w=300.0),
)


def configs(case: Case) -> tuple[list[Config], list[str]]:
    """The governed policies of ``case`` and their labels."""
    naive = load_config(NAIVE, enforce_trust=False)
    if case.profile != "rtx4070":  # the seed's absolute watts would deep-cap another card
        naive = replace(naive, power=replace(naive.power, ladder_w=("100%", "90%")))
    ladder = Config(source="defaults")
    target = load_config(TARGET, enforce_trust=False)
    target = replace(target, power=replace(target.power, target_c=case.ceiling_c, floor_w=None))
    out = [naive, ladder, target]
    labels = ["naive rule", "default ladder", "target mode"]
    if case.budget_w is not None:
        budget = load_config(BUDGET, enforce_trust=False)
        node = replace(budget.node, power_budget_w=case.budget_w)
        out = [replace(c, node=node) for c in out]
        static = replace(out[-1], node=replace(node, share="weight"))
        out.append(static)
        labels = [f"{x} + budget" for x in labels] + ["target mode, static equal split"]
    return out, labels


def run_case(case: Case, hours: float, seed: int) -> list[dict[str, object]]:
    """Every policy of ``case`` as :func:`policy_document` dicts (the baseline first)."""
    setup = SimSetup(
        load_profile(case.profile), load_scenario(case.scenario), hours * HOUR_S, seed=seed, gpu_count=case.gpus
    )
    cfgs, labels = configs(case)
    c = compare(setup, cfgs, labels)
    return [policy_document(run, c.baseline) for run in (c.baseline, *c.runs)]


def above(policy: dict[str, object], ceiling_c: float) -> float:
    """Seconds above the ceiling (the worst GPU)."""
    table = policy["seconds_above_c"]
    assert isinstance(table, dict)
    return float(table[f"{ceiling_c:g}"])


def table(results: list[tuple[Case, list[dict[str, object]]]]) -> str:
    """The matrix as Markdown."""
    lines = [
        "| scenario | ceiling | policy | peak C | s > ceiling | changes / h | busiest hour | throughput | energy kWh "
        "| max sum of limits W |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, policies in results:
        for p in policies:
            limit_sum = p["limit_sum_max_w"]
            ratio = p["throughput_ratio"]
            lines.append(
                f"| {case.label} | {case.ceiling_c:g} C | {p['name']} | {p['peak_c']:.2f} "
                f"| {above(p, case.ceiling_c):.0f} "
                f"| {p['changes_per_hour']:.2f} | {p['busiest_hour_changes']} "
                f"| {100.0 * float(ratio):.1f} % | {p['energy_kwh']:.3f} "  # type: ignore[arg-type]
                f"| {'' if limit_sum is None or case.gpus == 1 else f'{limit_sum:g}'} |"
            )
    return "\n".join(lines)


def _by_name(policies: list[dict[str, object]], name: str) -> dict[str, object]:
    return next(p for p in policies if p["name"] == name)


def goals(results: list[tuple[Case, list[dict[str, object]]]]) -> list[tuple[str, bool, str]]:
    """Issue 16's goals for target mode and the budget: (goal, met, the numbers)."""
    out: list[tuple[str, bool, str]] = []
    for case, policies in results:
        suffix = " + budget" if case.budget_w is not None else ""
        target = _by_name(policies, "target mode" + suffix)
        ladder = _by_name(policies, "default ladder" + suffix)
        t_above = above(target, case.ceiling_c)
        t_thr, l_thr = float(target["throughput_ratio"]), float(ladder["throughput_ratio"])  # type: ignore[arg-type]
        name = case.label
        out.append((f"{name}: target mode 0 s above {case.ceiling_c:g} C", t_above == 0.0, f"{t_above:.0f} s"))
        if l_thr >= 0.95:
            out.append(
                (
                    f"{name}: target mode >= 95 % throughput (the ladder reaches it)",
                    t_thr >= 0.95,
                    f"{100 * t_thr:.1f} %",
                )
            )
        busiest = int(target["busiest_hour_changes"])  # type: ignore[call-overload]
        out.append((f"{name}: target mode <= 4 changes in any hour", busiest <= 4, f"busiest hour {busiest}"))
        if case.profile == "h100-80gb" or case.scenario == "hot":
            ok = t_thr > l_thr and float(target["peak_c"]) <= float(ladder["peak_c"])  # type: ignore[arg-type]
            out.append(
                (
                    f"{name} (compute-bound): more throughput than the ladder at an equal or lower peak",
                    ok,
                    f"{100 * t_thr:.1f} % at {target['peak_c']:.2f} C vs ladder {100 * l_thr:.1f} % at "
                    f"{ladder['peak_c']:.2f} C",
                )
            )
        if case.budget_w is not None:
            static = _by_name(policies, "target mode, static equal split")
            s_thr = float(static["throughput_ratio"])  # type: ignore[arg-type]
            for p in policies[1:]:
                top = p["limit_sum_max_w"]
                ok = top is not None and float(top) <= case.budget_w  # type: ignore[arg-type]
                out.append(
                    (f"{name}: {p['name']}: sum of limits <= {case.budget_w:g} W at every tick", ok, f"max {top} W")
                )
            out.append(
                (
                    f"{name}: total throughput >= static equal split",
                    t_thr >= s_thr,
                    f"{100 * t_thr:.1f} % vs {100 * s_thr:.1f} %",
                )
            )
    return out


def plot(results: list[tuple[Case, list[dict[str, object]]]], path: Path) -> None:
    """Throughput against seconds above the ceiling, one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"no governor": "o", "naive": "s", "default": "^", "target mode,": "P", "target": "D"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (case, policies) in zip(axes.flat, results):
        for p in policies:
            name = str(p["name"])
            marker = next((m for key, m in markers.items() if name.startswith(key)), "x")
            x = above(p, case.ceiling_c) / 3600.0
            y = 100.0 * float(p["throughput_ratio"])  # type: ignore[arg-type]
            ax.scatter([x], [y], marker=marker, s=60, label=name)
        ax.set_title(f"{case.label} ({case.profile}, ceiling {case.ceiling_c:g} C)", fontsize=9)
        ax.set_xlabel("hours above the ceiling", fontsize=8)
        ax.set_ylabel("throughput vs no governor, %", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Issue 16 matrix: throughput against time above the scenario's ceiling (top left is best)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    """Run the matrix; print (and with --write store) the table and the goals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours per run (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="power noise seed (default 0)")
    parser.add_argument("--only", help="run only the scenarios whose label contains this")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--plot", type=Path, help="write the plot here (needs matplotlib)")
    parser.add_argument("--json", type=Path, help="also write every policy document here")
    args = parser.parse_args()
    cases = [c for c in CASES if args.only is None or args.only in c.label]
    results = []
    for case in cases:
        print(f"running {case.label} ...", file=sys.stderr, flush=True)
        results.append((case, run_case(case, args.hours, args.seed)))
    text = table(results)
    checks = goals(results)
    lines = [text, ""] + [f"- {g}: {'met' if ok else '**not met**'} ({why})" for g, ok, why in checks]
    body = "\n".join(lines)
    print(body)
    if args.json is not None:
        args.json.write_text(json.dumps([{"case": c.label, "policies": p} for c, p in results], indent=1))
    if args.plot is not None:
        plot(results, args.plot)
    if args.write:
        doc = BENCHMARKS.read_text()
        head, _, rest = doc.partition(BEGIN)
        _, _, tail = rest.partition(END)
        note = f"`python3 bench/target_matrix.py --hours {args.hours:g} --seed {args.seed} --write`"
        BENCHMARKS.write_text(f"{head}{BEGIN}\n<!-- generated by {note}; do not edit -->\n{body}\n{END}{tail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
