"""Calibration: fit the thermal model on the first half of the real H100 trace, predict the second.

``python3 bench/calibration.py [TRACE]`` (default ``tests/data/h100-load.jsonl``, a copy of
``shared/traces/h100-load.jsonl``) splits the trace's samples in two halves by count,
writes each half as a trace of its own (the device record, then its samples), and runs
``gpu-governor calibrate FIRST --check SECOND``: the check RMSE is the error of predicting
the second half's temperatures from its power alone, started at its first measured
temperature. Also reports the model run on from t = 0 through both halves (no measured
temperature after the first), scored on the second half. Prints a Markdown table.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from governor.cli import main as cli_main
from governor.sim.calibrate import samples_from_trace, validate_split
from governor.trace import read_trace

DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "tests" / "data" / "h100-load.jsonl"
GOAL_C = 2.0


def split(trace: Path, folder: Path) -> tuple[Path, Path, int, int]:
    """Write the two halves of ``trace``; returns their paths and sample counts."""
    devices: list[str] = []
    samples: list[str] = []
    for line in trace.read_text(encoding="utf-8").splitlines():
        if line.strip():
            (devices if json.loads(line)["record"] == "device" else samples).append(line)
    cut = len(samples) // 2
    first, second = folder / "first-half.jsonl", folder / "second-half.jsonl"
    first.write_text("\n".join([*devices, *samples[:cut]]) + "\n", encoding="utf-8")
    second.write_text("\n".join([*devices, *samples[cut:]]) + "\n", encoding="utf-8")
    return first, second, cut, len(samples) - cut


def main() -> int:
    """Run the benchmark and print its table."""
    trace = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_TRACE
    with tempfile.TemporaryDirectory() as tmp:
        first, second, n_first, n_second = split(trace, Path(tmp))
        out = io.StringIO()
        code = cli_main(["calibrate", str(first), "--check", str(second)], out=out, err=sys.stderr)
        if code != 0:
            return code
    text = out.getvalue()
    fit_rmse = float(re.search(r"fit RMSE ([0-9.]+) C", text).group(1))  # type: ignore[union-attr]
    check_rmse = float(re.search(r"check RMSE ([0-9.]+) C", text).group(1))  # type: ignore[union-attr]
    continued = validate_split(samples_from_trace(read_trace(trace))).continued_rmse_c
    print(text.rstrip())
    print()
    print("| trace | fit on | fit RMSE C | check on | check RMSE C | run on from t=0 C | goal |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {trace.name} | first {n_first} samples | {fit_rmse:.3f} | last {n_second} samples | {check_rmse:.3f} "
        f"| {continued:.3f} | <= {GOAL_C:g} C: {'met' if check_rmse <= GOAL_C else 'MISSED'} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
