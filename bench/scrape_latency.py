"""p50 of GET /metrics on a simulated governor, this checkout against others, side by side (no GPU).

``python3 bench/scrape_latency.py [--tree PATH ...] [--scrapes N] [--gpus G] [--processes P]``
starts one child per checkout (this one first, then each ``--tree``). Each child builds a
governor with ``G`` scripted GPUs, publishes a state with ``P`` per-process VRAM series per
GPU (``[vram] per_process_metrics = true``) as a new object every ``--tick-s`` seconds, as
the daemon does each tick, and serves it the way that checkout's ``run`` does (the cached
:class:`governor.metrics.Exposition` where it exists, else a registry rendered per scrape).
The parent scrapes the children in turn and prints JSON: p50/p99 per checkout (ms), the
body size, and each checkout's p50 over the first one's, for two clients: urllib (whose own
header parsing adds a few hundred microseconds of Python to every sample of every checkout
alike) and a raw socket (one connect, one send, reads to the end: a client as cheap as a Go
scraper), whose ratio shows the server's own difference.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, tempfile, threading, time
from dataclasses import replace
tree, gpus, processes, tick_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sys.path.insert(0, tree)
from governor import logsetup
logsetup.configure("json", "error")
import governor.metrics as metrics
from governor.clock import VirtualClock
from governor.config import Config
from governor.daemon import Daemon, VirtualWaiter
from governor.httpserver import MetricsServer
from governor.model import ClassUsage, ProcessRow
from governor.notify import Notifier
from tests.scripted import ScriptedBackend

clock = VirtualClock()
backend = ScriptedBackend(clock, lambda t, i: 80.0 if i == 0 else 50.0, gpu_count=gpus)
daemon = Daemon(Config(state_dir=tempfile.mkdtemp()), backend, clock, waiter=VirtualWaiter(clock), notifier=Notifier())
daemon.start()
for _ in range(5):
    clock.advance(1.0)
    daemon.tick()
rows = tuple(
    ProcessRow(1000 + i, f"python{i}", "training", f"job{i}.service", 2**30 + i, "uid") for i in range(processes)
)
usage = (ClassUsage("training", processes * 2**30, processes, 0),)
gpu_rows = tuple(replace(g, processes=rows, classes=usage) for g in daemon.published.gpus)
base = replace(daemon.published, gpus=gpu_rows, per_process_metrics=True)
current = [base]

def tick():
    while True:
        time.sleep(tick_s)
        current[0] = replace(current[0], tick_count=current[0].tick_count + 1)  # a new state object, as each tick

threading.Thread(target=tick, daemon=True).start()
source = lambda: current[0]
served = metrics.Exposition(source) if hasattr(metrics, "Exposition") else metrics.build_registry(source)
server = MetricsServer("127.0.0.1", 0, served)
print(server.port, flush=True)
sys.stdin.read()
server.close()
"""


def pct(samples: list[float]) -> dict[str, float]:
    """p50 and p99 of ``samples`` (ms)."""
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3),
    }


def get(url: str) -> bytes:
    """The body of ``url`` (loopback http)."""
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback http only
        body: bytes = r.read()
        return body


def raw_get(url: str) -> bytes:
    """The whole answer (status line, headers and body) to one plain GET of ``url`` over a fresh
    connection, read to the end: one connect, one send, the reads."""
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.rpartition(":")
    with socket.create_connection((name, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], help="another checkout to measure (repeatable)")
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--tick-s", type=float, default=1.0, help="seconds between two published states")
    args = parser.parse_args()
    trees = [str(REPO), *(str(Path(t).resolve()) for t in args.tree)]
    children = []
    try:
        for tree in trees:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, tree, str(args.gpus), str(args.processes), str(args.tick_s)],
                cwd=tree,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None
            children.append((tree, child, f"http://127.0.0.1:{int(child.stdout.readline())}/metrics"))
        samples: dict[str, list[float]] = {tree: [] for tree in trees}
        raw: dict[str, list[float]] = {tree: [] for tree in trees}
        sizes: dict[str, int] = {}
        for _, _, url in children:
            get(url)  # warm up
            raw_get(url)
        for _ in range(args.scrapes):
            for tree, _, url in children:
                t0 = time.perf_counter()
                sizes[tree] = len(get(url))
                samples[tree].append((time.perf_counter() - t0) * 1000)
                t1 = time.perf_counter()
                raw_get(url)
                raw[tree].append((time.perf_counter() - t1) * 1000)
    finally:
        for _, child, _ in children:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(10)
    first = statistics.median(samples[trees[0]])
    first_raw = statistics.median(raw[trees[0]])
    result: dict[str, Any] = {
        "gpus": args.gpus,
        "processes_per_gpu": args.processes,
        "trees": {
            tree: {
                **pct(samples[tree]),
                "bytes": sizes[tree],
                "p50_over_this": round(statistics.median(samples[tree]) / first, 2),
                "raw": {
                    **pct(raw[tree]),
                    "p50_over_this": round(statistics.median(raw[tree]) / first_raw, 2),
                },
            }
            for tree in trees
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
