"""Fan assist on a real NVIDIA GPU, read-only: the governor in dry run with ``[fan] mode = "assist"``.

Marker ``gpu``; skipped where NVML does not start. Nothing is ever set: the config says
``dry_run = true`` and the command line ``--dry-run``. On a board without fans NVML can
drive (a data-center GPU: H100, H200) the fans must be reported monitor-only once per
GPU, at info level, with no fan decision and no error; on a card with fans the dry run
must say what it would set and leave the fans' control policy as it found it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, scrape, wait_for

pynvml = pytest.importorskip("pynvml")

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


def fan_facts() -> list[dict[str, Any]]:
    """Per GPU, read-only: its fan count (None: NotSupported) and each fan's control policy and speed;
    empty when NVML does not start."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        return [_gpu_fans(index) for index in range(int(pynvml.nvmlDeviceGetCount()))]
    finally:
        pynvml.nvmlShutdown()


def _gpu_fans(index: int) -> dict[str, Any]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    try:
        count = int(pynvml.nvmlDeviceGetNumFans(handle))
    except pynvml.NVMLError as exc:
        return {"gpu": index, "fans": None, "why": str(exc)}
    fans = []
    for fan in range(count):
        entry: dict[str, Any] = {"fan": fan}
        for key, read in (
            ("policy", getattr(pynvml, "nvmlDeviceGetFanControlPolicy_v2", None)),
            ("speed", pynvml.nvmlDeviceGetFanSpeed_v2),
        ):
            try:
                entry[key] = None if read is None else read(handle, fan)
            except pynvml.NVMLError as exc:
                entry[key] = f"error: {exc}"
        fans.append(entry)
    return {"gpu": index, "fans": count, "per_fan": fans}


if not fan_facts():
    pytest.skip("no NVIDIA GPU answers NVML here", allow_module_level=True)


def report(what: str, **values: object) -> None:
    print(f"GPU-PROOF {what}: " + json.dumps(values, default=str), flush=True)


def test_assist_in_dry_run_reports_fans_once_and_changes_nothing(tmp_path: Path) -> None:
    """Dry run, assist mode with a raise_at_c every GPU is above: fanless GPUs are monitor-only once (info, no
    error, no fan decision); GPUs with fans get "would set" decisions; no fan's control policy changes."""
    before = fan_facts()
    report("fans_before", gpus=before)
    port = free_port()
    (tmp_path / "state").mkdir(mode=0o755)
    config = tmp_path / "governor.toml"
    config.write_text(
        f'dry_run = true\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = ""\n'
        '[fan]\nmode = "assist"\nmax_percent = 75.0\nraise_at_c = 31.0\nlower_at_c = 30.0\n'
    )
    os.chmod(config, 0o644)
    log_path = tmp_path / "governor.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "governor", "run", "--dry-run", "--config", str(config),
             "--listen", f"127.0.0.1:{port}", "--log-format", "json"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )  # fmt: skip
    try:
        wait_for(lambda: "gpu_governor_ready 1.0" in scrape(port), 30, "governor ready")
        time.sleep(5.0)  # a few ticks of the fan rule
        body = scrape(port)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    events = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
    assert code == 0
    fan_lines = [x for x in body.splitlines() if "gpu_fan_" in x and not x.startswith("#")]
    report("fan_metrics", lines=fan_lines)
    errors = [e for e in events if e.get("level") in ("error", "critical")]
    assert errors == [], errors
    for gpu in before:
        index = gpu["gpu"]
        mine = [e for e in events if e.get("gpu") == index and "fan" in str(e["event"])]
        report("fan_events", gpu=index, events=mine)
        if not gpu["fans"]:
            assert [(e["event"], e["level"]) for e in mine] == [("gpu_fans_monitor_only", "info")]
            assert f'gpu_governor_gpu_fan_monitor_only{{gpu="{index}"' in body
            assert f'gpu_governor_gpu_fan_target_ratio{{fan="0",gpu="{index}"' not in body
        else:
            assert any(e["event"] == "fan_would_set" for e in mine), (
                "a card with fans: the dry run says what it would set"
            )
            assert not any(e["event"] in ("fan_speed_set", "fan_set_failed") for e in mine)
    after = fan_facts()
    report("fans_after", gpus=after)
    assert [(g["gpu"], g["fans"], [f.get("policy") for f in g.get("per_fan", [])]) for g in after] == [
        (g["gpu"], g["fans"], [f.get("policy") for f in g.get("per_fan", [])]) for g in before
    ], "dry run must not change any fan's control policy"
