"""Tick and scrape cost against GPU and process counts, on the simulated backend (no GPU needed).

``python3 bench/sim_scaling.py [--ticks N]`` prints a Markdown table: for 1, 8 and 16
GPUs with 0, 64 and 256 processes each, the p50/p99 of one whole daemon tick (read +
/proc inspection + rules + publish) and of one /metrics rendering (default config:
per-process series off). The processes are real (``sleep`` children), so the /proc
reads cost what they cost on a real host.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import generate_latest

from governor import logsetup
from governor.backends.simulated import build_simulated_backend
from governor.clock import VirtualClock
from governor.config import Config, SimulationConfig
from governor.daemon import Daemon, VirtualWaiter
from governor.metrics import build_registry
from governor.notify import Notifier


def pct(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) of ``samples``."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def measure(gpus: int, processes: int, pids: list[int], ticks: int) -> tuple[float, float, float, float]:
    """Tick and scrape (p50, p99) in milliseconds."""
    clock = VirtualClock()
    sim = SimulationConfig(profile="rtx4070", scenario="idle", gpu_count=gpus)
    backend = build_simulated_backend(sim, clock)
    for gpu in range(gpus):
        for pid in pids[:processes]:
            backend.attach_process(gpu, pid, 64 * 2**20)
    with tempfile.TemporaryDirectory() as state:
        config = Config(state_dir=state, backend="simulated", simulation=sim)
        daemon = Daemon(config, backend, clock, waiter=VirtualWaiter(clock), notifier=Notifier())
        daemon.start()
        registry = build_registry(lambda: daemon.published)
        tick_ms, scrape_ms = [], []
        for i in range(ticks + 20):
            clock.advance(1.0)
            t0 = time.perf_counter()
            daemon.tick()
            t1 = time.perf_counter()
            generate_latest(registry)
            t2 = time.perf_counter()
            if i >= 20:
                tick_ms.append((t1 - t0) * 1000)
                scrape_ms.append((t2 - t1) * 1000)
        daemon.stop()
    return (*pct(tick_ms), *pct(scrape_ms))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200)
    args = parser.parse_args()
    logsetup.configure("json", "error")
    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(256)]
    try:
        pids = [p.pid for p in sleepers]
        print("| GPUs | processes/GPU | tick p50 ms | tick p99 ms | scrape p50 ms | scrape p99 ms |")
        print("|---:|---:|---:|---:|---:|---:|")
        for gpus in (1, 8, 16):
            for processes in (0, 64, 256):
                t50, t99, s50, s99 = measure(gpus, processes, pids, args.ticks)
                print(f"| {gpus} | {processes} | {t50:.3f} | {t99:.3f} | {s50:.3f} | {s99:.3f} |", flush=True)
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
