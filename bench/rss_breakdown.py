"""Where a process's resident memory lies: RSS per mapping, from /proc/PID/smaps (read-only).

``python3 bench/rss_breakdown.py PID [PID ...]`` prints JSON: per PID, its VmRSS and the resident
KiB of each group of mappings (the heap, anonymous memory, thread stacks, and each file-backed
library or file by its name), largest first. Comparing the daemon with a Python that only
initialises NVML shows which part of the difference is the Python heap and which the driver's
libraries and their allocations.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def breakdown(pid: int) -> dict[str, object]:
    """VmRSS (KiB) and the resident KiB per mapping group of ``pid``."""
    groups: Counter[str] = Counter()
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            path = head[5] if len(head) > 5 else ""
            name = Path(path).name if path.startswith("/") else (path or "[anonymous]")
        elif line.startswith("Rss:"):
            groups[name] += int(line.split()[1])
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {"vmrss_kib": rss, "by_mapping_kib": dict(groups.most_common())}


def main(argv: list[str]) -> int:
    print(json.dumps({pid: breakdown(int(pid)) for pid in argv}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
