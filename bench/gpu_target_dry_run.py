"""Target mode on a real NVIDIA GPU, in dry run, under a load it starts itself: the model's
60-s prediction error and the limits it would set. Read-only: it never changes a GPU setting.

``python3 bench/gpu_target_dry_run.py [--minutes 5] [--target-c C] [--out DIR]`` (repo root, on
the GPU machine, with torch for ``tests/gpu/gpu_load.py``):

1. records ``nvidia-smi``'s limits and temperature;
2. starts ``gpu-governor run --dry-run`` (``dry_run = true`` in its config too) in target mode on
   every GPU, metrics on 127.0.0.1:19848, JSON logs, and ``gpu-governor record`` (1 s, every
   GPU: the raw readings, ``trace.jsonl``; it only reads NVML);
3. runs a PyTorch matmul load in bursts on GPU 0 that step the power both ways: idle 30 s,
   then load, idle, load, idle (30 %, 20 %, 30 %, 20 % of the rest);
4. scrapes ``/metrics`` every 5 s: temperature, power, the model's 60-s prediction error,
   its root mean square, rise per watt and room;
5. stops the governor and the recorder, and prints the prediction-error statistics and every
   would-set decision (``power_limit_would_set`` events with their reasons); checks that the
   limits ``nvidia-smi`` shows are unchanged.

``summary.json`` holds the statistics, the decisions, ``raw`` (every GPU's per-second ``t``,
``temperature_c`` and ``power_w``, for ``bench/fit_replay.py`` to replay through the fit
offline) and ``replay`` (that replay, run here on this checkout's fit).

In dry run the limit is never applied, so the die does not cool when the controller "lowers"
it; each decision is what the controller would have set had the previous ones taken effect.
The default target is the idle temperature + 12 C, so a bf16 matmul load needs the controller.
Everything is written to ``--out`` (default ./gg-target-out) as well.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from governor.errors import TraceError  # noqa: E402
from governor.trace import read_trace  # noqa: E402
from governor.whatif.fitreplay import raw_record, replay_all, report, samples_from_trace  # noqa: E402
from governor.whatif.fitreplay import summary as replay_summary  # noqa: E402

PORT = 19848
QUERY = "index,name,power.limit,power.default_limit,power.min_limit,power.max_limit,temperature.gpu"
SERIES = {
    "temp": "gpu_governor_gpu_temperature_celsius",
    "power": "gpu_governor_gpu_power_watts",
    "limit": "gpu_governor_gpu_power_limit_watts",
    "target": "gpu_governor_gpu_power_limit_target_watts",
    "error": "gpu_governor_gpu_model_prediction_error_celsius",
    "rmse": "gpu_governor_gpu_model_prediction_rmse_celsius",
    "r": "gpu_governor_gpu_model_thermal_resistance_celsius_per_watt",
    "room": "gpu_governor_gpu_model_ambient_celsius",
    "fitted": "gpu_governor_gpu_model_fitted",
}


def smi() -> str:
    """nvidia-smi's view of every GPU's limits and temperature (CSV)."""
    return subprocess.run(
        ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader"], capture_output=True, text=True, check=True
    ).stdout


def limits(csv: str) -> list[str]:
    """The enforced power limit of every GPU in nvidia-smi's CSV."""
    return [row.split(",")[2].strip() for row in csv.splitlines() if row.strip()]


def scrape() -> dict[str, dict[str, float]]:
    """GPU 0's and GPU 1's ... values of SERIES from /metrics: {series: {gpu: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5) as response:
        body = response.read().decode()
    out: dict[str, dict[str, float]] = {k: {} for k in SERIES}
    for key, name in SERIES.items():
        for match in re.finditer(rf'^{name}{{gpu="(\d+)"[^}}]*}} (\S+)$', body, re.MULTILINE):
            out[key][match.group(1)] = float(match.group(2))
    return out


def load(seconds: float, log: Path) -> subprocess.Popen[bytes]:
    """A PyTorch matmul load on GPU 0 for ``seconds`` (4 GiB held)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "gpu" / "gpu_load.py"), "4", str(seconds)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
    )


def main() -> int:
    """Run the dry run; print and write what it saw. Exit 1 if a GPU limit changed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the governor runs (default 5)")
    parser.add_argument("--target-c", type=float, help="target temperature (default: idle + 12 C)")
    parser.add_argument("--out", type=Path, default=Path("gg-target-out"), help="where to write the results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    before = smi()
    print("nvidia-smi before:\n" + before)
    idle_c = float(before.splitlines()[0].split(",")[-1])
    target_c = args.target_c if args.target_c is not None else idle_c + 12.0
    work = Path(tempfile.mkdtemp(prefix="gg-target-"))
    os.chmod(work, 0o755)  # noqa: S103 - root-owned, readable: the governor refuses a state_dir others write
    (work / "state").mkdir(mode=0o755)
    config = work / "governor.toml"
    config.write_text(
        f'dry_run = true\nstate_dir = "{work / "state"}"\nruntime_dir = ""\n'
        f'[power]\nmode = "target"\ntarget_c = {target_c:.1f}\n'
        f"[metrics]\nport = {PORT}\n[vram]\nenabled = false\n"
    )
    os.chmod(config, 0o644)
    log = args.out / "governor.log"
    # This checkout first, then the caller's path (where a machine keeps wheels it was carried).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    governor = subprocess.Popen(
        [sys.executable, "-m", "governor", "run", "--config", str(config), "--dry-run", "--log-format", "json"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    total_s = args.minutes * 60.0
    trace = args.out / "trace.jsonl"
    recorder = subprocess.Popen(
        [sys.executable, "-m", "governor", "record", "--output", str(trace), "--interval", "1"],
        stdout=(args.out / "record.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    # Steps both ways for the fit: idle 30 s, then load, idle, load, idle.
    rest = max(0.0, total_s - 30.0)
    plan = [(30.0, None), (0.3 * rest, "load"), (0.2 * rest, None), (0.3 * rest, "load"), (total_s, None)]
    samples: list[dict[str, object]] = []
    start = time.monotonic()
    load_log = args.out / "load.log"
    worker: subprocess.Popen[bytes] | None = None
    phase_end = 0.0
    try:
        for length, kind in plan:
            phase_end = min(total_s, phase_end + length)
            if kind == "load":
                worker = load(phase_end - (time.monotonic() - start) + 5.0, load_log)
            while time.monotonic() - start < phase_end:
                time.sleep(5.0)
                if governor.poll() is not None:
                    sys.exit(f"the governor exited {governor.returncode}; its log: {log}\n{log.read_text()[-3000:]}")
                try:
                    values = scrape()
                except OSError as exc:
                    values = {"error": {"scrape": math.nan}}
                    print(f"scrape failed: {exc}", file=sys.stderr)
                samples.append({"t_s": round(time.monotonic() - start, 1), "load": kind == "load", **values})
                gpu0 = {k: v.get("0") for k, v in values.items()}
                print(json.dumps({"t_s": samples[-1]["t_s"], "load": kind == "load", **gpu0}), flush=True)
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=30)
                worker = None
    finally:
        if worker is not None:
            worker.kill()
        governor.send_signal(signal.SIGTERM)
        governor.wait(timeout=60)
        recorder.send_signal(signal.SIGINT)  # the recorder stops cleanly on Ctrl-C
        recorder.wait(timeout=60)
    after = smi()
    print("nvidia-smi after:\n" + after)
    errors = [s["error"].get("0") for s in samples if isinstance(s.get("error"), dict)]  # type: ignore[union-attr]
    errors = [e for e in errors if isinstance(e, float) and math.isfinite(e)]
    decisions = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") in ("power_limit_would_set", "power_limit_targeted", "power_limit_held"):
            decisions.append({k: event.get(k) for k in ("timestamp", "gpu", "rule", "from_w", "to_w", "reason")})
    summary: dict[str, object] = {
        "target_c": target_c,
        "samples": len(samples),
        "prediction_error_samples": len(errors),
        "prediction_error_mean_abs_c": sum(abs(e) for e in errors) / len(errors) if errors else None,
        "prediction_error_rms_c": math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else None,
        "prediction_error_max_abs_c": max((abs(e) for e in errors), default=None),
        "last_model": {k: samples[-1].get(k) for k in ("r", "room", "rmse", "fitted")} if samples else None,
        "would_set": decisions,
        "limits_unchanged": [r.split(",")[2] for r in before.splitlines()]
        == [r.split(",")[2] for r in after.splitlines()],
    }
    try:
        recorded = read_trace(trace)
    except TraceError as exc:
        summary["raw_error"] = str(exc)
        print(f"the raw readings could not be read: {exc}", file=sys.stderr)
    else:
        results = replay_all(samples_from_trace(recorded))
        summary["replay"] = replay_summary(results)
        summary["raw"] = raw_record(recorded)
        print("offline replay of the raw readings through this checkout's fit:\n" + report(results))
    (args.out / "samples.json").write_text(json.dumps(samples, indent=1))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "raw"}, indent=1))
    return 0 if summary["limits_unchanged"] else 1


if __name__ == "__main__":
    sys.exit(main())
