"""End to end under a real systemd: the .deb in a freshly debootstrapped Debian 12.

The module builds the .deb (or takes ``GG_DEB``), debootstraps Debian 12 minbase
with only its main archive, boots it with ``systemd-nspawn --boot`` (systemd as
PID 1, a private network namespace with only loopback), installs the .deb with
dpkg while systemd runs, and drives the unit from the host through ``nsenter``
into the container's PID 1. A drop-in selects the simulated backend and shortens
the watchdog and restart delays; /etc/gpu-governor/governor.toml (the conffile)
is rewritten by the test to run the hot scenario fast, with the simulated GPU's
power limit kept in a file under the state directory so it outlives the process.

The tests run in file order and share the container: install, start/READY,
governing, reload, watchdog, crash, stop, the hardened action paths, upgrade and
purge. Nothing is cached between runs. Needs root, systemd-nspawn, debootstrap,
nsenter and the .deb build tools (.ci/install-system-deps.sh); without them the
tests skip, unless GG_REQUIRE_SYSTEM_TESTS=1 (CI), where they fail.

Environment: GG_DEB (a prebuilt .deb), GG_DEBIAN_MIRROR (default
http://deb.debian.org/debian), GG_KEEP_ROOT=1 (keep the container's root for a
post-mortem; its path is printed).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.system.nspawn import (
    CONFIG,
    HOST_PATH,
    STATE_DIR,
    UNIT,
    UNIT_FILE,
    Container,
    Event,
    booted,
    host,
    metric,
    sim_config,
    unavailable,
    wait_for,
)

pytestmark = pytest.mark.system

T = TypeVar("T")


# --------------------------------------------------------------------------- the container


# --------------------------------------------------------------------------- fixtures


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        unavailable("system tests need root (debootstrap, systemd-nspawn, nsenter)")
    tools = ["systemd-nspawn", "debootstrap", "nsenter", "dpkg-buildpackage", "dpkg-deb", "pgrep"]
    if not os.environ.get("GG_DEB"):
        tools += ["dh", "pybuild"]
    missing = [t for t in tools if shutil.which(t, path=HOST_PATH) is None]
    if missing:
        unavailable(f"missing tools: {', '.join(missing)} (run .ci/install-system-deps.sh)")


# The drop-in a user would add to try the governor on a simulated GPU (installed before the
# .deb), plus test-only short watchdog and restart delays.
DROP_IN = textwrap.dedent(
    """\
    [Unit]
    # test only: the test restarts the unit more often than a crash loop would
    StartLimitIntervalSec=0

    [Service]
    ExecStart=
    ExecStart=/usr/bin/gpu-governor run --simulate
    # test only: find a frozen daemon within 3 s and restart quickly
    WatchdogSec=3s
    TimeoutAbortSec=3s
    RestartSec=1s
    LimitCORE=0
    """
)


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest) -> Iterator[Container]:
    """A booted Debian 12 with gpu-governor installed from the .deb and running on a simulated GPU."""
    check_prerequisites()
    with booted("e2e", DROP_IN, lambda: bool(request.session.testsfailed)) as container:
        yield container


def make_config(hot_c: float = 80.0, step_down_at_c: float = 75.0) -> str:
    """The test's governor.toml: the simulated RTX 4070 in the hot scenario, 20x real time."""
    sections = f"[thermal]\nhot_c = {hot_c}\n\n[power]\nstep_down_at_c = {step_down_at_c}\nstep_up_at_c = 65.0\n"
    return sim_config("tests/system/test_systemd_e2e.py", "hot", sections + "debounce_samples = 2\n", time_scale=20.0,
                      metrics=True)  # fmt: skip


# --------------------------------------------------------------------------- tests, in order


def test_installs_enabled_and_started_by_dpkg(box: Container) -> None:
    """dpkg -i on a booted system installs the conffile, enables and starts the unit (dh_installsystemd)."""
    box.sh("dpkg -i /var/tmp/gpu-governor.deb", timeout=120)
    assert box.sh("dpkg-query -W -f='${Conffiles}' gpu-governor").stdout.strip().startswith(CONFIG)
    assert box.sh(f"systemctl is-enabled {UNIT}", check=False).stdout.strip() == "enabled"
    state = wait_for(
        "the unit to be active after install",
        lambda: box.show("ActiveState")["ActiveState"] == "active" or None,
        30,
    )
    assert state
    verify = box.sh(f"systemd-analyze verify /lib/systemd/system/{UNIT}", check=False)
    assert verify.returncode == 0, verify.stderr
    # From here on the test's own config (root-owned 0644: the trust check accepts it).
    box.write(CONFIG, make_config())
    box.sh(f"systemctl restart {UNIT}", timeout=60)


def test_1_start_returns_after_ready_with_status(box: Container) -> None:
    """`systemctl start` returns only once READY=1 was sent: active at once, STATUS= shown by status."""
    box.sh(f"systemctl stop {UNIT}", timeout=60)
    assert box.show("ActiveState")["ActiveState"] == "inactive"
    box.sh(f"systemctl start {UNIT}", timeout=90)
    props = box.show("ActiveState", "SubState", "StatusText", "MainPID")
    assert props["ActiveState"] == "active", props
    assert props["SubState"] == "running", props
    # READY is sent after the first snapshot and after the metrics port is bound.
    page = box.metrics()
    assert page is not None, "metrics not answering right after start returned"
    assert metric(page, "gpu_governor_ready") == 1.0
    status_text = props["StatusText"]
    assert status_text.startswith("governing 1 GPU(s)"), props
    status = box.sh(f"systemctl status --no-pager --lines=0 {UNIT}", check=False).stdout
    assert 'Status: "governing 1 GPU(s)' in status, status


def test_2_steps_limit_in_hot_scenario_and_logs_decision(box: Container) -> None:
    """The hot scenario drives the limit down; the decision is in the journal with its fields, at info."""
    page = wait_for("the metrics page", box.metrics, 10)
    original = metric(page, "gpu_governor_gpu_power_limit_default_watts", gpu="0")
    assert original is not None

    def stepped() -> list[Event] | None:
        events = [e for e in box.daemon_events() if e.event == "power_limit_stepped"]
        return events or None

    events = wait_for("a power_limit_stepped event", stepped, 60, interval=0.5)
    step = events[0]
    for field in ("GPU", "GPU_UUID", "RULE", "FROM_W", "TO_W", "TEMPERATURE_C", "THRESHOLD_C"):
        assert field in step.fields, step.fields
    assert step.priority == 6, f"a planned step is info, got priority {step.priority}: {step.fields}"

    def enforced_limit_below_original() -> float | None:
        page = box.metrics()
        limit = None if page is None else metric(page, "gpu_governor_gpu_power_limit_watts", gpu="0")
        return limit if limit is not None and limit < original else None

    # The next snapshot after the step reads the new limit back.
    wait_for("the enforced limit metric to drop", enforced_limit_below_original, 10)
    assert box.sim_limit_w() < original
    # The recorded original is the limit found before the first change.
    recorded = box.originals()
    assert recorded and all(v == original for v in recorded), recorded
    # journalctl -p warning shows the daemon's warnings and errors only: the
    # syslog prefix reached journald, so info events are not among them.
    everything = box.daemon_events()
    assert any(e.priority == 6 for e in everything), "no info-level entries: is PRIORITY= sent?"
    for entry in box.journal("-p", "warning"):
        assert int(entry["PRIORITY"]) <= 4, entry
        assert entry.get("EVENT") not in ("power_limit_stepped", "governor_ready"), entry


def test_2_journal_field_queries_find_the_decision(box: Container) -> None:
    """Native entries: `journalctl -u gpu-governor RULE=power_step_down` and GPU_UUID= return the step, a sentence."""
    steps = wait_for(
        "journalctl RULE=power_step_down to return the step down",
        lambda: box.journal("RULE=power_step_down") or None,
        30,
        interval=0.5,
    )
    step = steps[0]
    shown = box.sh(f"journalctl --no-pager -o verbose -n 1 -u {UNIT} RULE=power_step_down").stdout
    print(f"[e2e] journalctl -u {UNIT} RULE=power_step_down -o verbose -n 1:\n{shown}")
    assert (step["EVENT"], step["SYSLOG_IDENTIFIER"], step["PRIORITY"]) == ("power_limit_stepped", "gpu-governor", "6")
    assert step["_SYSTEMD_UNIT"] == UNIT, "the native entry is the unit's (journald's own, trusted field)"
    assert step["GPU"] == "0" and step["ACTION"] == "set_power_limit"
    assert float(step["TO"]) < float(step["FROM"])
    message = step["MESSAGE"]
    assert re.fullmatch(
        r"GPU 0 power limit \d+ W -> \d+ W: temperature \d+(\.\d+)? C >= \d+(\.\d+)? C for \d+ consecutive samples",
        message,
    ), message
    uuid = step["GPU_UUID"]
    assert uuid.startswith("GPU-"), uuid
    by_uuid = box.journal(f"GPU_UUID={uuid}", "EVENT=power_limit_stepped")
    assert step["__CURSOR"] in [e["__CURSOR"] for e in by_uuid]
    assert box.journal("GPU_UUID=GPU-00000000-0000-0000-0000-000000000000") == []
    # Every event the daemon logged went native: a sentence, never a bare <N> token line.
    for event in box.daemon_events(f"_PID={step['_PID']}"):
        assert event.event, f"not a native entry: {event.fields}"
        assert " " in event.message and "=" not in event.message.split(" ", 1)[0], event.message


def test_3_reload_keeps_old_config_when_invalid_and_applies_valid_one(box: Container) -> None:
    """SIGHUP with a broken file: still active, error logged, old thresholds; with a valid file: new ones."""
    pid = box.main_pid()

    def hot_threshold() -> float | None:
        page = box.metrics()
        return (
            None
            if page is None
            else metric(page, "gpu_governor_gpu_thermal_zone_threshold_celsius", gpu="0", zone="hot")
        )

    assert wait_for("the hot threshold metric", hot_threshold, 10) == 80.0
    box.write(CONFIG, make_config() + '\n[thermal]\nhot_c = "very"\n')  # invalid: duplicate table, wrong type
    assert box.sh(f"systemctl reload {UNIT}", check=False).returncode != 0, "a refused file fails the reload job"
    errors = wait_for(
        "config_reload_failed in the journal",
        lambda: [e.message for e in box.daemon_events("-p", "err") if e.event == "config_reload_failed"] or None,
        15,
    )
    assert CONFIG in errors[0]
    assert box.show("ActiveState")["ActiveState"] == "active"
    assert box.main_pid() == pid

    def reload_ok_metric() -> float | None:
        page = box.metrics()
        return None if page is None else metric(page, "gpu_governor_config_last_reload_successful")

    # Metrics are published each tick: wait for the first one after the reload.
    assert wait_for("the reload-failed metric", lambda: reload_ok_metric() == 0.0 or None, 10)
    assert hot_threshold() == 80.0, "the invalid config must not replace the running one"

    # A config writable by others is refused too (it decides what gets signalled).
    box.write(CONFIG, make_config(hot_c=78.0), mode=0o666)
    assert box.sh(f"systemctl reload {UNIT}", check=False).returncode != 0
    wait_for(
        "the trust refusal in the journal",
        lambda: [e for e in box.daemon_events("-p", "err") if "writable by group or others" in e.message] or None,
        15,
    )
    assert hot_threshold() == 80.0

    box.write(CONFIG, make_config(hot_c=78.0, step_down_at_c=74.0))
    box.sh(f"systemctl reload {UNIT}")
    assert wait_for("the new hot threshold", lambda: hot_threshold() == 78.0 or None, 15)
    assert reload_ok_metric() == 1.0
    assert any(
        e.event == "config_reloaded" and e.fields.get("STEP_DOWN_AT_C") == "74.0" and "74 C" in e.message
        for e in box.daemon_events()
    )
    assert box.main_pid() == pid
    assert box.show("ActiveState")["ActiveState"] == "active"


def _restarted_after(box: Container, old_pid: int, restarts: int, timeout: float) -> int:
    def new_pid() -> int | None:
        props = box.show("MainPID", "ActiveState", "SubState", "NRestarts")
        pid = int(props["MainPID"])
        ok = pid not in (0, old_pid) and props["ActiveState"] == "active" and props["SubState"] == "running"
        return pid if ok and int(props["NRestarts"]) > restarts else None

    return wait_for("the unit to be restarted with a new main process", new_pid, timeout)


def _limit_restored_or_governed(box: Container, new_pid: int, original: float) -> None:
    """After a crash the new process restores the recorded original, or steps it again by the rules."""
    originals = box.originals()
    assert all(v == original for v in originals), f"recorded original corrupted: {originals}"

    def settled() -> str | None:
        mine = [e for e in box.daemon_events() if e.pid == new_pid]
        if any(e.fields.get("RULE") == "restore_after_crash" for e in mine):
            return "restored"
        if box.sim_limit_w() == original:
            return "at original"
        if any(e.event == "power_limit_stepped" for e in mine):
            return "governed again"
        return None

    wait_for("the limit to be restored or governed again after the restart", settled, 30)


def test_4_watchdog_kills_frozen_daemon_and_restart_after_kill_9(box: Container) -> None:
    """SIGSTOP: the watchdog fires and systemd restarts the unit; SIGKILL: restarted too."""
    page = box.metrics()
    assert page is not None
    original = metric(page, "gpu_governor_gpu_power_limit_default_watts", gpu="0")
    assert original is not None
    props = box.show("MainPID", "NRestarts")
    pid, restarts = int(props["MainPID"]), int(props["NRestarts"])
    box.sh(f"kill -STOP {pid}")
    new_pid = _restarted_after(box, pid, restarts, 30)
    messages = [e.get("MESSAGE", "") for e in box.journal() if "Watchdog timeout" in str(e.get("MESSAGE", ""))]
    assert messages, "systemd did not log a watchdog timeout"
    _limit_restored_or_governed(box, new_pid, original)

    restarts = int(box.show("NRestarts")["NRestarts"])
    box.sh(f"kill -KILL {new_pid}")
    newest = _restarted_after(box, new_pid, restarts, 30)
    _limit_restored_or_governed(box, newest, original)


def test_6_metrics_answer_on_loopback_inside_container(box: Container) -> None:
    """The endpoint answers on 127.0.0.1 in the container's own network namespace; status reads it."""
    page = wait_for("the metrics endpoint", box.metrics, 15)
    assert "gpu_governor_gpu_power_limit_watts" in page
    assert metric(page, "gpu_governor_ready") == 1.0
    status = box.sh("gpu-governor status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr


def test_hardened_unit_can_still_do_its_job(box: Container) -> None:
    """Under the unit's exact sandbox: pynvml loads, /proc of other users reads, a pidfd signal lands.

    The earlyoom lesson: a syscall filter that kills the daemon at its first real
    action is only found by exercising that action under the hardened unit.
    """
    unit = box.read(f"/lib/systemd/system/{UNIT}")
    service = unit.split("[Service]", 1)[1].split("[Install]", 1)[0]
    # Everything but the lifecycle: a oneshot, and no RuntimeDirectory= (stopping the
    # probe would remove the running governor's /run/gpu-governor).
    dropped = (
        "Type=", "ExecStart=", "ExecReload=", "ExecStop", "NotifyAccess=", "WatchdogSec=", "Restart", "Timeout",
        "RuntimeDirectory",
    )  # fmt: skip
    sandbox = "\n".join(line for line in service.splitlines() if not line.startswith(dropped))
    probe = textwrap.dedent(
        """\
        import os, signal, socket, sys, time
        sys.path.insert(0, "/usr/lib/gpu-governor")
        import psutil, pynvml
        try:
            pynvml.nvmlInit()
            print("nvml: initialised")
        except pynvml.NVMLError as exc:  # no driver in the container: an NVML error, not a SIGSYS
            print("nvml:", exc)
        victim = int(sys.argv[1])
        proc = psutil.Process(victim)
        cgroup = open(f"/proc/{victim}/cgroup").read().strip()
        print("victim:", proc.username(), proc.cmdline(), proc.create_time() > 0, cgroup)
        fd = os.pidfd_open(victim)
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        os.close(fd)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
        with open("/var/lib/gpu-governor/probe", "w") as f:
            f.write("ok")
        for _ in range(50):
            try:
                gone = psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone:
                print("PROBE-OK")
                break
            time.sleep(0.1)
        """
    )
    box.write("/usr/local/lib/gg-probe.py", probe)
    box.sh("systemd-run --unit=gg-victim.service -p User=nobody /bin/sleep 600")
    victim = int(box.sh("systemctl show -p MainPID --value gg-victim.service").stdout.strip())
    assert victim > 0
    box.write(
        "/run/systemd/system/gg-probe.service",
        f"[Service]\nType=oneshot\nExecStart=/usr/bin/python3 -I /usr/local/lib/gg-probe.py {victim}\n{sandbox}\n",
    )
    box.sh("systemctl daemon-reload")
    result = box.sh(
        "systemctl start gg-probe.service; echo rc=$?; journalctl --no-pager -o cat -u gg-probe.service",
        check=False,
        timeout=60,
    )
    print(result.stdout)
    assert "PROBE-OK" in result.stdout, result.stdout + result.stderr
    assert "nvml:" in result.stdout, result.stdout
    assert box.show("ActiveState")["ActiveState"] == "active"


def test_5_stop_restores_original_limit_and_ends_inactive_success(box: Container) -> None:
    """`systemctl stop`: SIGTERM, the original limit restored, inactive with result success and status 0."""
    page = box.metrics()
    assert page is not None
    original = metric(page, "gpu_governor_gpu_power_limit_default_watts", gpu="0")
    assert original is not None
    wait_for("the limit to be stepped down before stopping", lambda: box.sim_limit_w() < original or None, 30)
    box.sh(f"systemctl stop {UNIT}", timeout=60)
    props = box.show("ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success", props
    assert props["ExecMainStatus"] == "0", props
    assert box.sim_limit_w() == original
    events = [e for e in box.daemon_events() if e.event == "power_limit_restored"]
    assert events, "no power_limit_restored event on stop"


def test_upgrade_keeps_modified_conffile_and_restarts(box: Container) -> None:
    """Reinstall, then upgrade to a version whose shipped config changed: the admin's file is kept."""
    box.sh(f"systemctl start {UNIT}", timeout=60)
    admin = box.read(CONFIG)
    box.sh("dpkg -i /var/tmp/gpu-governor.deb", timeout=120)
    assert box.read(CONFIG) == admin
    assert box.show("ActiveState")["ActiveState"] == "active"

    # A newer version with a changed default config: repack the .deb.
    work = Path(tempfile.mkdtemp(prefix="gg-upgrade-", dir=box.root / "var/tmp"))
    tree = work / "tree"
    host(["dpkg-deb", "-R", str(box.deb), str(tree)])
    control = (tree / "DEBIAN/control").read_text()
    version = re.search(r"^Version: (\S+)$", control, re.M)
    assert version is not None
    new_version = version.group(1) + "+upgrade1"
    (tree / "DEBIAN/control").write_text(control.replace(f"Version: {version.group(1)}", f"Version: {new_version}"))
    shipped = tree / "etc/gpu-governor/governor.toml"
    shipped.write_text(shipped.read_text() + "\n# changed in the new version\n")
    # md5sums lists every file but the conffiles (as dh_md5sums writes it).
    md5 = "find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\\0' | xargs -0 md5sum"
    host(["sh", "-c", f"cd {tree} && {md5} > DEBIAN/md5sums"])
    host(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(work / "new.deb")])
    inside = "/" + str((work / "new.deb").relative_to(box.root))
    old_pid = box.main_pid()
    box.sh(f"dpkg --force-confold -i {inside}", timeout=120)
    assert box.sh("dpkg-query -W -f='${Version}' gpu-governor").stdout == new_version
    assert box.read(CONFIG) == admin, "the admin's config must survive the upgrade"
    assert box.exists(CONFIG + ".dpkg-dist")
    assert box.show("ActiveState")["ActiveState"] == "active"
    assert box.main_pid() != old_pid, "the upgrade restarts the daemon"
    shutil.rmtree(work)


def test_purge_removes_state(box: Container) -> None:
    """`dpkg --purge` stops the unit and removes /var/lib/gpu-governor, the config and the enablement."""
    assert box.exists(STATE_DIR)
    box.sh("dpkg --purge gpu-governor", timeout=120)
    assert not box.exists(STATE_DIR)
    assert not box.exists(CONFIG)
    assert not box.exists(f"/etc/systemd/system/multi-user.target.wants/{UNIT}")
    assert box.sh(f"systemctl is-active {UNIT}", check=False).stdout.strip() in ("inactive", "unknown")


def test_unit_security_exposure_at_most_2_5() -> None:
    """systemd-analyze security --offline=yes scores the shipped unit at most 2.5 (it talks to systemd on D-Bus too)."""
    if shutil.which("systemd-analyze", path=HOST_PATH) is None:
        unavailable("systemd-analyze is not installed")
    result = host(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT_FILE)], check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5, result.stdout
