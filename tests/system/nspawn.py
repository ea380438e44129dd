"""The machinery of the system tests under a real systemd: a Debian 12 root, booted with
systemd-nspawn, driven through nsenter (see tests/system/test_systemd_e2e.py for how it works).

Shared by tests/system/test_units_e2e.py and test_systemd_e2e.py (which keeps its own
``Container``, whose journal reading returns native entries' fields).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = "gpu-governor.service"
UNIT_FILE = REPO / "systemd" / UNIT
RESTART_QUICKLY = "[Unit]\nStartLimitIntervalSec=0\n\n[Service]\nRestartSec=1s\n"
"""A test-only drop-in: restart a killed governor within a second, however often a test kills it."""
CONFIG = "/etc/gpu-governor/governor.toml"
STATE_DIR = "/var/lib/gpu-governor"
SIM_STATE = f"{STATE_DIR}/simulated-gpus.json"
ORIGINALS = f"{STATE_DIR}/original-limits.json"
METRICS_URL = "http://127.0.0.1:9847/metrics"
SUITE = "bookworm"
HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT_S = 180.0  # generous: a busy 2-core machine; a failure reports what the boot was doing
REQUIRED = os.environ.get("GG_REQUIRE_SYSTEM_TESTS") == "1"
T = TypeVar("T")


def unavailable(reason: str) -> None:
    """Skip, or fail when CI requires the system tests to run."""
    if REQUIRED:
        pytest.fail(f"GG_REQUIRE_SYSTEM_TESTS=1 but {reason}")
    pytest.skip(reason)


def host(cmd: list[str], timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a host command with Debian's tools first on PATH; output captured as text."""
    env = {**os.environ, "PATH": HOST_PATH + ":" + os.environ.get("PATH", "")}
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.25) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


# --------------------------------------------------------------------------- the container


@dataclass(frozen=True)
class Event:
    """One journal entry of the daemon: its PID, PRIORITY, EVENT (empty for a line), MESSAGE and every field."""

    pid: int
    priority: int
    event: str
    message: str
    fields: dict[str, Any]


@dataclass
class Container:
    """A booted Debian 12 root; commands run in it through nsenter into its PID 1."""

    root: Path
    nspawn: subprocess.Popen[bytes]
    leader: int
    deb: Path

    def sh(
        self, script: str, timeout: float = 60, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the container, with a clean environment."""
        cmd = [
            "nsenter", "-t", str(self.leader), "-a",
            "env", "-i", f"PATH={HOST_PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0",
            "sh", "-c", script,
        ]  # fmt: skip
        return host(cmd, timeout=timeout, check=check, input=stdin)

    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        """``systemctl show`` properties of ``unit`` (the governor's by default)."""
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a root-owned file inside the container (through nsenter: /run and /tmp are its own tmpfs)."""
        self.sh(
            f"mkdir -p $(dirname {path}) && cat > {path} && chown root:root {path} && chmod {mode:o} {path}",
            stdin=text,
        )

    def read(self, path: str) -> str:
        return self.sh(f"cat {path}").stdout

    def exists(self, path: str) -> bool:
        return self.sh(f"test -e {path}", check=False).returncode == 0

    def metrics(self) -> str | None:
        """The metrics page, fetched inside the container on loopback; None when it does not answer."""
        script = (
            "import urllib.request, sys\n"
            f"page = urllib.request.urlopen({json.dumps(METRICS_URL)}, timeout=5).read()\n"
            "sys.stdout.write(page.decode())\n"
        )
        result = self.sh("python3 -", check=False, stdin=script)
        return result.stdout if result.returncode == 0 else None

    def journal(self, *args: str, unit: str = UNIT) -> list[dict[str, Any]]:
        """Journal entries of ``unit`` as JSON objects (``-o json``)."""
        out = self.sh(f"journalctl --no-pager -o json -u {unit} " + " ".join(args)).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def daemon_events(self, *args: str) -> list[Event]:
        """What the daemon itself logged: native entries (EVENT=, MESSAGE= a sentence, upper-case fields)."""
        events = []
        for entry in self.journal(*args):
            message = entry.get("MESSAGE")
            if entry.get("_COMM") == "systemd" or entry.get("SYSLOG_IDENTIFIER") == "systemd":
                continue
            if not isinstance(message, str):  # journald stores non-UTF-8 as a list of bytes
                continue
            events.append(
                Event(int(entry.get("_PID", 0)), int(entry.get("PRIORITY", 6)), entry.get("EVENT", ""), message, entry)
            )
        return events

    def sim_limit_w(self) -> float:
        """The simulated GPU 0's current ("hardware") power limit, from the backend's state file."""
        limits = json.loads(self.read(SIM_STATE))["power_limits_w"]
        return float(next(iter(limits.values())))

    def originals(self) -> list[float]:
        """The original limits the daemon recorded in its state directory (empty when none)."""
        if not self.exists(ORIGINALS):
            return []
        return [float(v) for v in json.loads(self.read(ORIGINALS))["original_power_limits_w"].values()]


HOT_POWER = "[power]\nstep_down_at_c = 75.0\nstep_up_at_c = 65.0\ndebounce_samples = 2\n"
"""A ladder that steps down within seconds of the hot scenario at 20x real time."""


def sim_config(
    written_by: str,
    scenario: str,
    sections: str = "",
    *,
    time_scale: float | None = None,
    metrics: bool = False,
    top: str = "",
    simulation: str = "",
) -> str:
    """A governor.toml on the simulated RTX 4070 in ``scenario`` (``time_scale`` times real time), polled
    every 0.5 s, its state under STATE_DIR; ``top``: more top-level lines; ``metrics``: served on
    127.0.0.1:9847; ``simulation``: more [simulation] lines; ``sections``: the tables that follow."""
    text = f'# written by {written_by}\nbackend = "simulated"\npoll_interval_s = 0.5\nstate_dir = "{STATE_DIR}"\n'
    text += top
    if metrics:
        text += '\n[metrics]\nlisten_address = "127.0.0.1"\nport = 9847\n'
    text += f'\n[simulation]\nprofile = "rtx4070"\nscenario = "{scenario}"\nstate_file = "{SIM_STATE}"\n'
    if time_scale is not None:
        text += f"time_scale = {time_scale}\n"
    return text + simulation + ("\n" + textwrap.dedent(sections) if sections else "")


def metric(page: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text page, None when absent."""
    for line in page.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)", line.strip())
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


def build_deb(out: Path) -> Path:
    prebuilt = os.environ.get("GG_DEB")
    if prebuilt:
        return Path(prebuilt).resolve()
    result = host([str(REPO / "packaging" / "build-deb.sh"), str(out)], timeout=300)
    return Path(result.stdout.strip().splitlines()[-1])


def deb_depends(deb: Path) -> list[str]:
    """Package names of the .deb's Depends (first alternative, no versions or arch qualifiers)."""
    field = host(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    names = []
    for clause in field.split(","):
        name = clause.split("|")[0].strip().split(" ")[0].split(":")[0]
        if name:
            names.append(name)
    return names


def debootstrap(root: Path, packages: list[str]) -> None:
    """Debian 12 minbase, main only, with systemd; then the .deb's dependencies installed by apt
    inside the root, which resolves what debootstrap's ``--include`` cannot (virtual packages
    such as python3-bcrypt's python3-cffi-backend-api-min)."""
    mirror = os.environ.get("GG_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    host(
        ["debootstrap", "--variant=minbase", "--components=main",
         "--include=systemd,systemd-sysv,dbus,python3", SUITE, str(root), mirror],
        timeout=400,
    )  # fmt: skip
    install = "apt-get update -qq && apt-get install -y -qq --no-install-recommends " + " ".join(sorted(set(packages)))
    host(
        ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit", "--pipe",
         "--setenv=DEBIAN_FRONTEND=noninteractive",
         "sh", "-c", install],
        timeout=400,
    )  # fmt: skip


def is_namespace_init(pid: int) -> bool:
    """Whether ``pid`` is PID 1 of a PID namespace below ours (the container's init).

    systemd-nspawn first forks an "outer child" in our namespace, which clones the container's
    init and exits. A probe in that window used to pick the outer child as the leader, and every
    later nsenter into it failed: stop 21's CI saw "systemd to finish booting" time out with
    nothing read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) >= 2 and ids[-1] == "1"
    return False


def boot(root: Path, deb: Path, log: Path) -> Container:
    """Boot the root with systemd as PID 1 and wait until it is up."""
    with open(log, "wb") as out:
        nspawn = subprocess.Popen(
            ["systemd-nspawn", "-q", "-D", str(root), "--boot", "--register=no", "--keep-unit",
             "--private-network", "--console=pipe", f"--machine=gg-e2e-{os.getpid()}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": HOST_PATH},
        )  # fmt: skip

    def leader() -> int | None:
        if nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {nspawn.returncode}: {log.read_text()[-3000:]}")
        children = host(["pgrep", "-P", str(nspawn.pid)], check=False).stdout.split()
        return next((int(pid) for pid in children if is_namespace_init(int(pid))), None)

    pid = wait_for("the container's PID 1", leader, 30)
    box = Container(root=root, nspawn=nspawn, leader=pid, deb=deb)

    seen: list[str] = []

    def up() -> str | None:
        state = box.sh("systemctl is-system-running", check=False, timeout=30).stdout.strip()
        seen.append(state)
        return state if state in ("running", "degraded") else None

    try:
        state = wait_for("the container's systemd to finish booting", up, BOOT_TIMEOUT_S, interval=0.5)
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\n{boot_report(box, seen, log)}") from None
    if state == "degraded":
        failed = box.sh("systemctl --failed --no-legend", check=False).stdout
        print(f"container booted degraded; failed units:\n{failed}")
    return box


def boot_report(box: Container, seen: list[str], log: Path) -> str:
    """What a boot that did not finish was doing: the states it went through, its pending jobs,
    its failed units and the end of its console."""
    states = " -> ".join(state for i, state in enumerate(seen) if i == 0 or seen[i - 1] != state)
    jobs = box.sh("systemctl list-jobs --no-legend", check=False, timeout=30).stdout
    failed = box.sh("systemctl --failed --no-legend", check=False, timeout=30).stdout
    console = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    return f"states: {states}\npending jobs:\n{jobs}\nfailed units:\n{failed}\nconsole:\n{console}"


def power_off(box: Container) -> None:
    """Power the container off; kill the nspawn process we started if it does not exit."""
    if box.nspawn.poll() is None:
        box.sh("systemctl --no-block poweroff", check=False, timeout=30)
        try:
            box.nspawn.wait(timeout=60)
        except subprocess.TimeoutExpired:
            box.nspawn.send_signal(signal.SIGKILL)
            box.nspawn.wait(timeout=30)


def remove_root(root: Path) -> None:
    """Unmount anything left under the root, then delete it."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(root))), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(root, ignore_errors=True)


def tear_down(
    container: Container | None, work: Path, *, failed: bool, tag: str, started: float, unit: str, lines: int = 150
) -> None:
    """The end of a booted container's module: ``unit``'s last ``lines`` journal lines when a test
    ``failed`` (post-mortem for CI logs), power off, then the root and ``work`` removed (kept with
    GG_KEEP_ROOT=1); ``tag`` prefixes what is printed, ``started`` (monotonic s) times the module."""
    if container is not None:
        if failed:
            tail = container.sh(f"journalctl --no-pager -o short-monotonic -n {lines} -u {unit}", check=False)
            print(f"[{tag}] journal of {unit} (last {lines} lines):\n{tail.stdout}")
        power_off(container)
    if os.environ.get("GG_KEEP_ROOT") == "1":
        print(f"[{tag}] kept {work}")
    else:
        remove_root(work / "root")
        shutil.rmtree(work, ignore_errors=True)
    print(f"[{tag}] module wall time {time.monotonic() - started:.0f}s")


@contextlib.contextmanager
def booted(
    tag: str,
    drop_in: str,
    failed: Callable[[], bool],
    *,
    prepare: Callable[[Path], None] | None = None,
    lines: int = 150,
) -> Iterator[Container]:
    """A Debian 12 booted in a container with the .deb built from this tree installed, for a module:
    the governor unit gets ``drop_in`` (as ``e2e.conf``) before the install, ``prepare`` writes anything
    else into the root; afterwards :func:`tear_down` (``failed``: whether a test failed, asked then)."""
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"gg-{tag}-"))
    root = work / "root"
    container: Container | None = None
    try:
        deb = build_deb(work / "deb")
        print(f"[{tag}] .deb {deb.name} ready after {time.monotonic() - started:.0f}s")
        debootstrap(root, deb_depends(deb))
        print(f"[{tag}] debootstrap done after {time.monotonic() - started:.0f}s")
        shutil.copy(deb, root / "var/tmp" / "gpu-governor.deb")
        unit_dir = root / "etc/systemd/system" / f"{UNIT}.d"
        unit_dir.mkdir(parents=True)
        (unit_dir / "e2e.conf").write_text(drop_in)
        if prepare is not None:
            prepare(root)
        container = boot(root, deb, work / "nspawn.log")
        print(f"[{tag}] container booted after {time.monotonic() - started:.0f}s")
        yield container
    finally:
        tear_down(container, work, failed=failed(), tag=tag, started=started, unit=UNIT, lines=lines)


def active(box: Container, unit: str) -> str:
    """``systemctl is-active UNIT`` inside the container (active, activating, failed, inactive...)."""
    return box.sh(f"systemctl is-active {unit}", check=False).stdout.strip()


def check_prerequisites() -> None:
    """Skip (or fail under GG_REQUIRE_SYSTEM_TESTS=1) without root and the tools."""
    if os.geteuid() != 0:
        unavailable("system tests need root (debootstrap, systemd-nspawn, nsenter)")
    tools = ["systemd-nspawn", "debootstrap", "nsenter", "dpkg-buildpackage", "dpkg-deb", "pgrep"]
    if not os.environ.get("GG_DEB"):
        tools += ["dh", "pybuild"]
    missing = [t for t in tools if shutil.which(t, path=HOST_PATH) is None]
    if missing:
        unavailable(f"missing tools: {', '.join(missing)} (run .ci/install-system-deps.sh)")
