"""Children that import one checkout: how the before/after benchmarks measure two trees side by side.

Each child is a fresh Python with that checkout first on its import path, started in it; it
prints its result as JSON on its last line of output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def tree_env(tree: Path) -> dict[str, str]:
    """The environment a child of ``tree`` runs in: that checkout first on the import path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(":")}


def run_child(tree: Path, code: str, *args: object, what: str = "child") -> Any:
    """Run ``code`` (``python -c``, with ``args``) in ``tree``; the JSON of its last output line.
    Exits the benchmark with the child's stderr when it fails."""
    result = subprocess.run(
        [sys.executable, "-c", code, *(str(a) for a in args)],
        cwd=tree,
        env=tree_env(tree),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"{what} of {tree} failed (exit {result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])
