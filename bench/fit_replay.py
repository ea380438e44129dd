"""Replay recorded readings through target mode's online thermal fit: its 60-s prediction error.

``python3 bench/fit_replay.py FILE [FILE ...] [--default-w W] [--json]`` (repo root). Each FILE is a
trace (``gpu-governor record``; ``tests/data/h100-load.jsonl`` is the real H100's) or the
``summary.json`` of ``bench/gpu_target_dry_run.py`` (its ``raw`` samples). Every GPU's
readings go through :func:`governor.rules.fit.replay`, the code the governor runs each tick,
and the 60-s-ahead prediction errors are reported as the governor's metric computes them
(mean absolute, root mean square, largest), with the room the fit inferred and its final model.
Read-only: it touches no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from governor.errors import WhatIfError  # noqa: E402
from governor.whatif.fitreplay import read_samples, replay_all, report, summary  # noqa: E402


def main() -> int:
    """Replay each file; print the report (or JSON). Exit 2 on a file that cannot be read."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="trace (JSON Lines) or dry-run summary.json")
    parser.add_argument("--default-w", type=float, help="the card's default power limit in W (overrides the file)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args()
    if args.default_w is not None and not args.default_w > 0:
        parser.error(f"--default-w: expected watts > 0, got {args.default_w}")
    documents = {}
    for path in args.files:
        try:
            results = replay_all(read_samples(path, args.default_w))
        except WhatIfError as exc:
            print(f"fit_replay: {exc}", file=sys.stderr)
            return 2
        if args.json:
            documents[str(path)] = summary(results)
        else:
            print(f"{path}:\n{report(results)}")
    if args.json:
        print(json.dumps(documents, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
