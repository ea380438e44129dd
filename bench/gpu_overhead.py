"""The governor's overhead on a real GPU, this checkout against others, side by side in one run (read-only).

``python3 bench/gpu_overhead.py [--tree PATH ...] [--iterations N] [--scrapes N] [--soak-s S]``
prints JSON with, for this checkout and each ``--tree`` (another checkout, e.g. the old code):

- ``tick``: p50/p99 microseconds per GPU of the NVML floor (exactly the NVML reads the
  governor makes per tick, bench/nvml_floor.py's list, and the XID event wait, in a
  tight loop) and of the
  governor's whole tick (read + rules + act + publish, NVML backend, dry run), interleaved
  in one loop in a child process that imports that checkout; ``ratio_p50`` = tick / floor
  (goal <= 1.5 on ONE GPU: run it on a one-GPU machine, ``gpus`` says how many it saw);
  ``tick_ratio_to_this`` = that checkout's tick p50 / this checkout's (issue 14: the
  telemetry may make the tick at most 10 % slower than the checkout before it);
  ``telemetry_us_p50``: each telemetry read alone (the slow ones run every 10 s; their
  sum is what a slow tick adds), or the NVML error it answered;
- ``scrape_ms``: p50/p99 of GET /metrics against that checkout's ``governor run --dry-run``;
  every daemon and nvitop-exporter (when it is installed) are scraped in turn, round-robin,
  so all see the same machine; ``ratio_p50_vs_nvitop_exporter`` (goal <= 0.25);
- ``rss_mib``: the running daemon's RSS after the scrapes and the soak, its CPU time over
  ``--soak-s`` seconds at 1 Hz (all daemons soak at once), and the RSS of a Python that
  only imports that checkout's daemon path; ``rss_over_baseline_mib`` = daemon RSS minus
  the RSS of a Python that only initialises NVML and reads each GPU once (goal <= 8);
  ``chosen_dependencies_over_baseline``: the same Python importing only structlog and
  prometheus_client, minus that baseline (what any daemon built on them starts from).

Rounds alternate between the checkouts (``--rounds``), so a drift of the machine (clocks,
temperature) affects them alike. It never changes a GPU setting: every governor runs with
``--dry-run`` and ``dry_run = true`` (power limits and processes are only logged).
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

from trees import run_child, tree_env

REPO = Path(__file__).resolve().parents[1]

TICK_CHILD = r"""
import json, sys, tempfile, time
tree, bench, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = [tree, bench]
import pynvml
from nvml_floor import raw_reads, telemetry_reads, time_each
from governor import logsetup
logsetup.configure("json", "warning")
from governor.backends.nvml import NvmlBackend
from governor.classes import VramPolicy
from governor.clock import RealClock
from governor.config import Config
from governor.daemon import Daemon, PipeWaiter
from governor.notify import Notifier

clock = RealClock()
backend = NvmlBackend(clock)
gpus = len(backend.gpus())
with tempfile.TemporaryDirectory() as state:
    config = Config(dry_run=True, state_dir=state, runtime_dir="", vram=VramPolicy(per_process_metrics=True))
    daemon = Daemon(config, backend, clock, waiter=PipeWaiter(clock), notifier=Notifier())
    daemon.start()
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]
    reads = [fn for h in handles for _, fn in raw_reads(pynvml, h)]
    event_set = pynvml.nvmlEventSetCreate()  # the floor waits on XID events once per tick, as the governor does
    for h in handles:
        pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, event_set)
    wait = dict(telemetry_reads(pynvml, handles[0], event_set))["xid_event_wait"]
    reads.append(wait)
    floor, tick = [], []
    for i in range(iterations + 100):
        t0 = time.perf_counter_ns()
        for fn in reads:
            fn()
        t1 = time.perf_counter_ns()
        daemon.tick()
        t2 = time.perf_counter_ns()
        if i >= 100:
            floor.append((t1 - t0) / gpus / 1000)
            tick.append((t2 - t1) / gpus / 1000)
    telemetry = time_each(telemetry_reads(pynvml, handles[0], event_set), 50)
    pynvml.nvmlEventSetFree(event_set)
    daemon.stop()  # last: it shuts NVML down
print(json.dumps({"gpus": gpus, "floor_us": floor, "tick_us": tick, "telemetry_us_p50": telemetry}))
"""

IMPORT_RSS_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import governor.cli, governor.daemon, governor.backends.nvml, governor.metrics, governor.httpserver
print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])
"""

BASELINE_NVML = """
import pynvml
pynvml.nvmlInit()
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    pynvml.nvmlDeviceGetTemperature(h, 0); pynvml.nvmlDeviceGetComputeRunningProcesses(h)
print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])
"""

DEPENDENCY_FLOOR = "import structlog, prometheus_client\n" + BASELINE_NVML
"""The baseline plus only the two chosen dependencies the daemon path imports (structlog for its
log, prometheus_client for its metrics): the least RSS any daemon built on them can have."""


def pct(samples: list[float]) -> dict[str, float]:
    """p50 and p99 of ``samples`` (same unit)."""
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3),
    }


def floor_and_tick(trees: list[Path], iterations: int, rounds: int) -> dict[str, Any]:
    """Per checkout: the NVML floor and the full tick per GPU, ``rounds`` alternating children."""
    samples: dict[Path, dict[str, Any]] = {tree: {"floor_us": [], "tick_us": []} for tree in trees}
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for tree in trees:
            got = run_child(tree, TICK_CHILD, tree, REPO / "bench", per_round, what="tick child")
            samples[tree]["gpus"] = got["gpus"]
            samples[tree]["telemetry_us_p50"] = got["telemetry_us_p50"]
            samples[tree]["floor_us"] += got["floor_us"]
            samples[tree]["tick_us"] += got["tick_us"]
    out = {}
    for tree, s in samples.items():
        floor, tick = pct(s["floor_us"]), pct(s["tick_us"])
        out[str(tree)] = {
            "gpus": s["gpus"],
            "floor_us_per_gpu": floor,
            "tick_us_per_gpu": tick,
            "ratio_p50": round(tick["p50"] / floor["p50"], 2),
            "ratio_p99": round(tick["p99"] / floor["p99"], 2),
            "telemetry_us_p50": s["telemetry_us_p50"],
        }
    this = out[str(trees[0])]["tick_us_per_gpu"]["p50"]
    for entry in out.values():
        entry["tick_ratio_to_this"] = round(entry["tick_us_per_gpu"]["p50"] / this, 3)
    return out


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str) -> bytes:
    """The body of ``url`` (loopback http)."""
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback http only
        body: bytes = r.read()
        return body


def raw_get(url: str) -> int:
    """Bytes of the whole answer to one plain GET of ``url`` over a fresh connection, read to the end:
    a client whose own cost is one connect, one send and the reads (as a Go scraper's is small),
    unlike urllib's header parsing, which adds a few hundred microseconds of Python to every sample."""
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.rpartition(":")
    with socket.create_connection((name, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode())
        total = 0
        while chunk := sock.recv(1 << 16):
            total += len(chunk)
        return total


def wait_up(url: str, timeout_s: float = 30) -> None:
    """Wait until ``url`` answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            get(url)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def nvitop_exporter_command() -> list[str] | None:
    """How to start nvitop-exporter here, or None when it is not installed."""
    found = shutil.which("nvitop-exporter")
    if found:
        return [found]
    probe = subprocess.run([sys.executable, "-c", "import nvitop_exporter"], capture_output=True, check=False)
    return [sys.executable, "-m", "nvitop_exporter"] if probe.returncode == 0 else None


def start_governor(tree: Path, work: Path, port: int) -> subprocess.Popen[bytes]:
    """``governor run --dry-run`` of ``tree`` on ``port`` (dry_run = true in its config as well)."""
    config = work / "g.toml"
    config.write_text(f'dry_run = true\nstate_dir = "{work / "state"}"\nruntime_dir = ""\n')
    config.chmod(0o644)
    command = ["run", "--dry-run", "--config", str(config), "--listen", f"127.0.0.1:{port}", "--log-format", "json"]
    return subprocess.Popen(
        [sys.executable, "-m", "governor", *command],
        cwd=tree,
        env=tree_env(tree),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def scrapes_and_soak(trees: list[Path], n: int, soak_s: float) -> dict[str, Any]:
    """Scrape every checkout's daemon and nvitop-exporter round-robin; then soak the daemons together."""
    endpoints: dict[str, str] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    works = []
    out: dict[str, Any] = {}
    try:
        for tree in trees:
            work = Path(tempfile.mkdtemp())
            works.append(work)
            port = free_port()
            procs[str(tree)] = start_governor(tree, work, port)
            endpoints[str(tree)] = f"http://127.0.0.1:{port}/metrics"
        exporter = nvitop_exporter_command()
        if exporter is not None:
            port = free_port()
            procs["nvitop_exporter"] = subprocess.Popen(
                [*exporter, "--bind-address", "127.0.0.1", "--port", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            endpoints["nvitop_exporter"] = f"http://127.0.0.1:{port}/metrics"
        else:
            out["nvitop_exporter"] = {"skipped": "nvitop-exporter is not installed"}
        for name, url in list(endpoints.items()):
            try:
                wait_up(url)
            except RuntimeError as exc:
                out[name] = {"error": str(exc)}
                del endpoints[name]
        time.sleep(2)
        samples: dict[str, list[float]] = {name: [] for name in endpoints}
        raw: dict[str, list[float]] = {name: [] for name in endpoints}
        sizes: dict[str, int] = {}
        for _ in range(n):
            for name, url in endpoints.items():
                t0 = time.perf_counter()
                sizes[name] = len(get(url))
                t1 = time.perf_counter()
                raw_get(url)
                samples[name].append((t1 - t0) * 1000)
                raw[name].append((time.perf_counter() - t1) * 1000)
        for name in endpoints:
            out[name] = {"scrape_ms": {**pct(samples[name]), "bytes": sizes[name]}, "scrape_raw_ms": pct(raw[name])}
        exporter_proc = procs.pop("nvitop_exporter", None)
        if exporter_proc is not None:
            exporter_proc.terminate()
            exporter_proc.wait(10)
        start = {str(t): (proc_rss_mib(procs[str(t)].pid), proc_cpu_s(procs[str(t)].pid)) for t in trees}
        time.sleep(soak_s)
        for tree in trees:
            pid = procs[str(tree)].pid
            rss0, cpu0 = start[str(tree)]
            rss1, cpu1 = proc_rss_mib(pid), proc_cpu_s(pid)
            out.setdefault(str(tree), {})["soak"] = {
                "seconds": soak_s,
                "rss_mib_start": round(rss0, 1),
                "rss_mib_end": round(rss1, 1),
                "cpu_pct_of_core": round(100 * (cpu1 - cpu0) / soak_s, 3) if soak_s else None,
            }
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        for work in works:
            shutil.rmtree(work, ignore_errors=True)
    return out


def rss_of(code: str, *args: str, tree: Path = REPO) -> float:
    """The RSS (MiB) a child running ``code`` prints (VmRSS in KiB)."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd=tree, env=tree_env(tree)
    )
    return round(int(result.stdout.split()[-1]) / 1024, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], help="another checkout to measure (repeatable)")
    parser.add_argument("--iterations", type=int, default=3000, help="ticks per checkout, over all rounds")
    parser.add_argument("--rounds", type=int, default=2, help="alternating tick rounds per checkout")
    parser.add_argument("--scrapes", type=int, default=200, help="scrapes of each endpoint")
    parser.add_argument("--soak-s", type=float, default=60.0, help="seconds the daemons run at 1 Hz for CPU and RSS")
    args = parser.parse_args()
    trees = [REPO, *(Path(t).resolve() for t in args.tree)]
    ticks = floor_and_tick(trees, args.iterations, args.rounds)
    served = scrapes_and_soak(trees, args.scrapes, args.soak_s)
    baseline = rss_of(BASELINE_NVML)
    dependency_floor = rss_of(DEPENDENCY_FLOOR)
    exporter_p50 = served.get("nvitop_exporter", {}).get("scrape_ms", {}).get("p50")
    result: dict[str, Any] = {
        "baseline_rss_mib": {
            "python_plus_nvml_init": baseline,
            "plus_structlog_and_prometheus_client_imported": dependency_floor,
            "chosen_dependencies_over_baseline": round(dependency_floor - baseline, 1),
        },
        "nvitop_exporter": served.get("nvitop_exporter"),
        "trees": {},
    }
    for tree in trees:
        name = str(tree)
        entry: dict[str, Any] = {"tick": ticks[name], **served.get(name, {})}
        entry["rss_mib_imports_only"] = rss_of(IMPORT_RSS_CHILD, name, tree=tree)
        soak = entry.get("soak", {})
        p50 = entry.get("scrape_ms", {}).get("p50")
        entry["ratios"] = {
            "tick_over_floor_p50": ticks[name]["ratio_p50"],
            "scrape_p50_over_nvitop_exporter": round(p50 / exporter_p50, 2) if p50 and exporter_p50 else None,
            "rss_over_baseline_mib": round(soak["rss_mib_end"] - baseline, 1) if soak else None,
        }
        result["trees"][name] = entry
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
