"""The whole governor on a real NVIDIA GPU: dry-run power decisions and real VRAM enforcement.

Marker ``gpu``; skipped where NVML does not start (CI has no GPU). Power is ALWAYS in
dry-run here (config ``dry_run = true`` and ``--dry-run``): no GPU setting is ever
changed. The only processes signalled are the test's own CUDA workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port, scrape, wait_for

pynvml = pytest.importorskip("pynvml")

pytestmark = pytest.mark.gpu
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _gpu_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    try:
        return int(pynvml.nvmlDeviceGetCount()) > 0
    finally:
        pynvml.nvmlShutdown()


if not _gpu_present():
    pytest.skip("no NVIDIA GPU answers NVML here", allow_module_level=True)


def enforced_limits_w() -> list[float]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=power.limit", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [float(x) for x in out.split()]


def nvml_pids() -> set[int]:
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return {int(x) for x in out.split()}


def report(what: str, **values: object) -> None:
    print(f"GPU-PROOF {what}: " + json.dumps(values, default=str), flush=True)


class Worker:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "vram_worker.py"), *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


class Stopper:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


class Governor:
    """The governor as a real process. ``dry_run``: the global dry run (no power limit changed,
    no process signalled); without it the caller's config must turn the power ladder off."""

    def __init__(self, tmp_path: Path, toml: str, *, dry_run: bool = True) -> None:
        self.port = free_port()
        config = tmp_path / "governor.toml"
        (tmp_path / "state").mkdir(mode=0o755)
        head = "dry_run = true\n" if dry_run else ""
        config.write_text(f'{head}state_dir = "{tmp_path / "state"}"\n' + toml)
        os.chmod(config, 0o644)
        self.log_path = tmp_path / "governor.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "governor",
                "run",
                *(["--dry-run"] if dry_run else []),
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--log-format",
                "json",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        wait_for(lambda: "gpu_governor_ready 1.0" in scrape(self.port), 30, "governor ready")

    def events(self) -> list[dict[str, object]]:
        return [json.loads(x) for x in self.log_path.read_text().splitlines() if x.startswith("{")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code


@pytest.fixture
def cleanup() -> Iterator[list[object]]:
    things: list[object] = []
    yield things
    for thing in reversed(things):
        stop = getattr(thing, "stop", None)
        if stop is not None:
            try:
                stop()
            except Exception as exc:
                print("cleanup:", exc)


def test_dry_run_decision_on_a_hot_real_gpu(tmp_path: Path, cleanup: list[object]) -> None:
    """With step-down below what the load reaches, the governor logs 'would set', counts it, and changes nothing."""
    before = enforced_limits_w()
    load = subprocess.Popen([sys.executable, str(HERE / "gpu_load.py"), "3", "90"], stdout=subprocess.PIPE, text=True)
    cleanup.append(Stopper(load))
    assert load.stdout is not None and load.stdout.readline().strip() == "ready"
    temp = int(pynvml_temp())
    step_down = max(temp - 3, 31)  # thresholds below 30 C are refused as implausible
    governor = Governor(
        tmp_path,
        f"[power]\nladder_w = [700.0, 600.0, 500.0]\nstep_down_at_c = {step_down}.0\n"
        f"step_up_at_c = {max(step_down - 12, 30)}.0\n"
        "debounce_samples = 2\nmin_change_interval_s = 5.0\n[vram]\nper_process_metrics = true\n",
    )
    cleanup.append(governor)
    wait_for(lambda: any(e["event"] == "power_limit_would_set" for e in governor.events()), 60, "would set")
    body = scrape(governor.port)
    would = next(e for e in governor.events() if e["event"] == "power_limit_would_set")
    report("would_set", event=would)
    assert 'outcome="dry_run"' in body and "gpu_governor_actions_total" in body
    assert f'pid="{load.pid}"' in body, "the load process is in the per-process metrics"
    pynvml.nvmlInit()
    count = int(pynvml.nvmlDeviceGetCount())
    pynvml.nvmlShutdown()
    for index in range(count):
        assert f'gpu_governor_gpu_temperature_celsius{{gpu="{index}"' in body, f"GPU {index} is read"
    decided = {int(str(e["gpu"])) for e in governor.events() if e["event"] == "power_limit_would_set"}
    report("per_gpu", gpus=count, would_set_for=sorted(decided))
    assert 0 in decided
    line = next(x for x in body.splitlines() if f'pid="{load.pid}"' in x)
    report("process_metric", line=line)
    assert enforced_limits_w() == before, "dry-run must not change the power limit"
    assert governor.stop() == 0
    assert enforced_limits_w() == before
    report("limits_unchanged", before=before, after=enforced_limits_w())


def pynvml_temp() -> float:
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
    finally:
        pynvml.nvmlShutdown()


def test_vram_grower_is_terminated_and_the_other_left_alone(tmp_path: Path, cleanup: list[object]) -> None:
    """Two real CUDA processes: the one growing past its 3 GiB budget gets SIGTERM after its grace; the other stays."""
    before = enforced_limits_w()
    steady = Worker("1", "0", "1", "1", "steady-marker")
    cleanup.append(steady)
    grower = Worker("1", "1", "2", "6", "grower-marker")
    cleanup.append(grower)
    # The global dry run would stop the SIGTERM too: instead the power ladder is off, so no GPU
    # setting can change while the test's own workers are really signalled.
    governor = Governor(
        tmp_path,
        "[power]\nenabled = false\n"
        "[vram]\ncooldown_s = 5.0\nper_process_metrics = true\n"
        '[[class]]\nname = "steady"\nbudget = "4GiB"\npriority = 100\naction = "terminate"\ngrace_s = 5.0\n'
        f'match = {{ cmdline = "steady-marker", user = {os.getuid()} }}\n'
        '[[class]]\nname = "grower"\nbudget = "3GiB"\npriority = 10\naction = "terminate"\ngrace_s = 5.0\n'
        "kill_after_s = 10.0\n"
        f'match = {{ cmdline = "grower-marker", user = {os.getuid()} }}\n',
        dry_run=False,
    )
    cleanup.append(governor)
    try:
        code = grower.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        tail = governor.log_path.read_text().splitlines()[-40:]
        pytest.fail("the grower was not stopped in 90 s; the governor's log ends:\n" + "\n".join(tail))
    events = governor.events()
    over = [e for e in events if e["event"] == "process_over_budget"]
    signalled = [e for e in events if e["event"] == "process_signalled"]
    report("over_budget", events=over)
    report("signalled", events=signalled, grower_exit=code)
    assert code == -signal.SIGTERM
    assert [e["pid"] for e in signalled] == [grower.proc.pid]
    assert all(e["class"] == "grower" for e in over + signalled)
    time.sleep(3)
    pids = nvml_pids()
    report("nvml_after", pids=sorted(pids), steady=steady.proc.pid, grower=grower.proc.pid)
    assert steady.proc.poll() is None and steady.proc.pid in pids
    assert grower.proc.pid not in pids
    assert governor.stop() == 0
    assert enforced_limits_w() == before
