"""The governor's overhead on a real GPU, measured side by side in one run (read-only).

``python3 bench/gpu_overhead.py [--iterations N] [--scrapes N] [--soak-s S]`` prints JSON:

- ``floor_us_per_gpu``: p50/p99 of exactly the NVML reads the governor makes per tick, in
  a tight loop (bench/nvml_floor.py's list), per GPU;
- ``tick_us_per_gpu``: p50/p99 of the governor's whole tick (read + rules + act +
  publish) with the NVML backend, power in dry-run, divided by the GPU count, and the
  ratio of the p50s (goal <= 2);
- ``scrape_ms``: p50/p99 of GET /metrics against the running governor, against
  nvitop-exporter on the same GPU, and of one ``nvidia-smi --query-gpu`` call;
- ``soak``: the governor daemon's RSS (MiB) and CPU time over ``--soak-s`` seconds at 1 Hz.

It never changes a GPU setting: the governor runs with ``--dry-run`` and ``dry_run = true``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from nvml_floor import raw_reads  # noqa: E402

from governor.backends.nvml import NvmlBackend  # noqa: E402
from governor.classes import VramPolicy  # noqa: E402
from governor.clock import RealClock  # noqa: E402
from governor.config import Config  # noqa: E402
from governor.daemon import Daemon, PipeWaiter  # noqa: E402
from governor.notify import Notifier  # noqa: E402


def pct(samples: list[float]) -> dict[str, float]:
    """p50 and p99 of ``samples`` (same unit)."""
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3),
    }


def floor_and_tick(iterations: int) -> dict[str, Any]:
    """The raw NVML floor and the governor's full tick, per GPU, interleaved in one loop."""
    import pynvml

    clock = RealClock()
    backend = NvmlBackend(clock)
    gpus = len(backend.gpus())
    with tempfile.TemporaryDirectory() as state:
        config = Config(dry_run=True, state_dir=state, vram=VramPolicy(per_process_metrics=True))
        daemon = Daemon(config, backend, clock, waiter=PipeWaiter(clock), notifier=Notifier())
        daemon.start()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]
        reads = [fn for h in handles for _, fn in raw_reads(pynvml, h)]
        floor_ns: list[float] = []
        tick_ns: list[float] = []
        for i in range(iterations + 100):
            t0 = time.perf_counter_ns()
            for fn in reads:
                fn()
            t1 = time.perf_counter_ns()
            daemon.tick()
            t2 = time.perf_counter_ns()
            if i >= 100:
                floor_ns.append((t1 - t0) / gpus / 1000)
                tick_ns.append((t2 - t1) / gpus / 1000)
        daemon.stop()
    floor, tick = pct(floor_ns), pct(tick_ns)
    return {
        "gpus": gpus,
        "floor_us_per_gpu": floor,
        "tick_us_per_gpu": tick,
        "ratio_p50": round(tick["p50"] / floor["p50"], 2),
        "ratio_p99": round(tick["p99"] / floor["p99"], 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback http only
        body: bytes = r.read()
        return body


def wait_up(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            get(url)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def scrape_ms(url: str, n: int) -> dict[str, Any]:
    samples = []
    size = 0
    for _ in range(n):
        t0 = time.perf_counter()
        size = len(get(url))
        samples.append((time.perf_counter() - t0) * 1000)
    return {**pct(samples), "bytes": size}


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrapes_and_soak(n: int, soak_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp())
    config = tmp / "g.toml"
    config.write_text(f'dry_run = true\nstate_dir = "{tmp / "state"}"\n')
    gport, nport = free_port(), free_port()
    governor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "governor",
            "run",
            "--dry-run",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{gport}",
            "--log-format",
            "json",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    exporter = None
    try:
        gurl = f"http://127.0.0.1:{gport}/metrics"
        wait_up(gurl)
        time.sleep(2)
        out["governor"] = scrape_ms(gurl, n)
        exporter_bin = shutil.which("nvitop-exporter")
        cmd = [exporter_bin] if exporter_bin else [sys.executable, "-m", "nvitop_exporter"]
        exporter = subprocess.Popen(
            [*cmd, "--bind-address", "127.0.0.1", "--port", str(nport)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            nurl = f"http://127.0.0.1:{nport}/metrics"
            wait_up(nurl)
            time.sleep(2)
            out["nvitop_exporter"] = scrape_ms(nurl, n)
        except RuntimeError as exc:
            out["nvitop_exporter"] = {"error": str(exc)}
        smi = []
        for _ in range(20):
            t0 = time.perf_counter()
            subprocess.run(
                ["nvidia-smi", "--query-gpu=temperature.gpu,power.draw,power.limit,memory.used", "--format=csv"],
                capture_output=True,
                check=True,
            )
            smi.append((time.perf_counter() - t0) * 1000)
        out["nvidia_smi_query"] = pct(smi)
        if exporter is not None:
            exporter.terminate()
            exporter.wait(10)
            exporter = None
        rss0, cpu0 = proc_rss_mib(governor.pid), proc_cpu_s(governor.pid)
        time.sleep(soak_s)
        rss1, cpu1 = proc_rss_mib(governor.pid), proc_cpu_s(governor.pid)
        out["soak"] = {
            "seconds": soak_s,
            "rss_mib_start": round(rss0, 1),
            "rss_mib_end": round(rss1, 1),
            "cpu_s": round(cpu1 - cpu0, 3),
            "cpu_pct_of_core": round(100 * (cpu1 - cpu0) / soak_s, 3),
        }
    finally:
        for p in (exporter, governor):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
    return out


BASELINE_NVML = """
import pynvml
pynvml.nvmlInit()
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    pynvml.nvmlDeviceGetTemperature(h, 0); pynvml.nvmlDeviceGetComputeRunningProcesses(h)
print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])
"""
BASELINE_GOVERNOR = """
import governor.daemon, governor.metrics, governor.httpserver, governor.backends.nvml
print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])
"""


def baseline_rss_mib() -> dict[str, float]:
    """RSS of a bare Python that only initialises NVML, and of one that only imports the governor."""
    out = {}
    for name, code in (("python_plus_nvml_init", BASELINE_NVML), ("python_plus_governor_imports", BASELINE_GOVERNOR)):
        text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
        out[name] = round(int(text.stdout.split()[-1]) / 1024, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--soak-s", type=float, default=60.0)
    args = parser.parse_args()
    from governor import logsetup

    logsetup.configure("json", "warning")
    result = {
        "tick": floor_and_tick(args.iterations),
        "scrape_ms": scrapes_and_soak(args.scrapes, args.soak_s),
        "baseline_rss_mib": baseline_rss_mib(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
