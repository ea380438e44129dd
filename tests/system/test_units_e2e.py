"""Issue 15's acceptance under a real systemd: stop and resume units through D-Bus, kill-restart loops.

A Debian 12 container booted with systemd-nspawn (tests/system/nspawn.py; the same machinery as
test_systemd_e2e.py) runs the .deb's hardened gpu-governor.service on a simulated RTX 4070
(12 GiB) that reports real processes with the VRAM a processes file gives them
(``[simulation] processes_file``, matched by cgroup): ``primary-llm.service`` (Restart=always,
6 GiB), ``secondary-sd.service`` (3 GiB), a game (1.5 GiB) in a transient unit under
``user.slice/user-1000.slice``, and ``looper.service`` (Restart=always) for the loop case.

In file order: install and check-config's Restart= warning; a dry run (nothing stopped, "would
stop unit" logged); the game pushes free VRAM under the 2 GiB reserve and the governor stops
secondary-sd.service through D-Bus (systemd's own journal of the unit shows the stop job); the
governor is killed while the unit is stopped and its successor starts the unit again once the
game has exited and the reserve stayed clear for resume_after_s; the primary is never touched;
a terminate class on a Restart=always unit is found in a kill-restart loop after 3 restarts and
signalled no more. Needs root, systemd-nspawn and debootstrap (.ci/install-system-deps.sh).
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.nspawn import (
    CONFIG,
    RESTART_QUICKLY,
    STATE_DIR,
    UNIT,
    Container,
    active,
    booted,
    check_prerequisites,
    metric,
    wait_for,
)

pytestmark = pytest.mark.system

GIB = 2**30
PROCESSES = "/etc/gpu-governor/sim-processes.json"
PRIMARY, SECONDARY, LOOPER, GAME = "primary-llm.service", "secondary-sd.service", "looper.service", "game-e2e.service"
RESUME_AFTER_S = 5.0
SERVICES = {
    PRIMARY: "Restart=always\nRestartSec=1s",
    SECONDARY: "Restart=on-failure\nRestartSec=1s",
    LOOPER: "Restart=always\nRestartSec=1s",
}


def processes_file() -> str:
    """Every workload of the test, by its cgroup, with the VRAM the simulated GPU reports for it."""
    entries = [
        {"gpu": 0, "cgroup": f"/system.slice/{PRIMARY}", "used_bytes": 6 * GIB, "name": "llama-server"},
        {"gpu": 0, "cgroup": f"/system.slice/{SECONDARY}", "used_bytes": 3 * GIB, "name": "comfyui"},
        {"gpu": 0, "cgroup": f"/user.slice/user-1000.slice/{GAME}", "used_bytes": 3 * GIB // 2, "name": "game"},
        {"gpu": 0, "cgroup": f"/system.slice/{LOOPER}", "used_bytes": GIB // 2, "name": "looper"},
    ]
    return json.dumps({"processes": entries})


def make_config(dry_run: bool) -> str:
    """The seed's split on a simulated RTX 4070; the secondary yields to the game and is resumed."""
    return textwrap.dedent(
        f"""\
        # written by tests/system/test_units_e2e.py
        backend = "simulated"
        poll_interval_s = 0.5
        dry_run = {str(dry_run).lower()}
        state_dir = "{STATE_DIR}"
        runtime_dir = "/run/gpu-governor"

        [metrics]
        listen_address = "127.0.0.1"
        port = 9847

        [simulation]
        profile = "rtx4070"
        scenario = "idle"
        state_file = "{STATE_DIR}/simulated-gpus.json"
        processes_file = "{PROCESSES}"

        [vram]
        reserve = "2GiB"
        cooldown_s = 2.0

        [[class]]
        name = "primary"
        budget = "6GiB"
        priority = 100
        action = "terminate"
        grace_s = 60.0
        match = {{ slice = "system.slice", unit = "{PRIMARY}" }}

        [[class]]
        name = "secondary"
        budget = "3GiB"
        priority = 50
        action = "stop-unit"
        resume = true
        resume_after_s = {RESUME_AFTER_S}
        match = {{ slice = "system.slice", unit = "{SECONDARY}" }}

        [[class]]
        name = "looper"
        budget = "256MiB"
        priority = 10
        action = "terminate"
        grace_s = 0.0
        kill_after_s = 30.0
        restart_loop_count = 3
        restart_loop_window_s = 600.0
        match = {{ slice = "system.slice", unit = "{LOOPER}" }}

        [[class]]
        name = "interactive"
        budget = "3GiB"
        priority = 200
        protected = true
        match = {{ slice = "user.slice" }}
        """
    )


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest) -> Iterator[Container]:
    """A booted Debian 12 with the .deb installed, the test's services and the governor running on them."""
    check_prerequisites()

    def services(root: Path) -> None:
        for name, restart in SERVICES.items():
            (root / "etc/systemd/system" / name).write_text(
                f"[Unit]\nDescription=e2e workload {name}\n\n[Service]\nExecStart=/bin/sleep infinity\n{restart}\n"
            )

    failed = lambda: bool(request.session.testsfailed)  # noqa: E731
    with booted("units-e2e", RESTART_QUICKLY, failed, prepare=services, lines=200) as container:
        yield container


def events(box: Container, name: str, pid: int | None = None) -> list[str]:
    """The governor's ``name`` events (of one daemon process when ``pid``), each as one text: a
    native entry's sentence and its fields as ``key=value`` (``unit=...``, ``restart=always``),
    or a ``<N>`` line as written."""
    found = []
    for e in box.daemon_events():
        if pid is not None and e.pid != pid:
            continue
        if e.event == name:
            fields = (f"{k.lower()}={v}" for k, v in e.fields.items() if k.isupper() and not k.startswith("_"))
            found.append(" ".join([e.message, *fields]))
        elif not e.event and e.message.startswith(name + " "):
            found.append(e.message)
    return found


def restart_governor(box: Container, dry_run: bool) -> int:
    box.write(CONFIG, make_config(dry_run))
    box.sh(f"systemctl restart {UNIT}", timeout=90)
    assert box.show("ActiveState")["ActiveState"] == "active"
    return box.main_pid()


def start_game(box: Container) -> None:
    box.sh(f"systemd-run --unit={GAME} --slice=user-1000.slice /bin/sleep infinity")


def stop_game(box: Container) -> None:
    box.sh(f"systemctl stop {GAME}", check=False)


def status_json(box: Container) -> dict[str, object]:
    result = box.sh("gpu-governor status --json", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    document: dict[str, object] = json.loads(result.stdout)
    return document


def test_setup_and_check_config_warns_about_restart_always(box: Container) -> None:
    """Installed with python3-jeepney; check-config asks systemd and warns that killing the primary would loop."""
    box.sh("dpkg -i /var/tmp/gpu-governor.deb", timeout=120)
    assert box.sh("dpkg-query -W -f='${Status}' python3-jeepney").stdout.endswith("installed")
    box.write(PROCESSES, processes_file())
    box.sh(f"systemctl daemon-reload && systemctl start {PRIMARY} {SECONDARY}")
    box.write(CONFIG, make_config(dry_run=False))
    check = box.sh(f"gpu-governor check-config {CONFIG}", check=False)
    assert check.returncode == 0, check.stderr
    assert f"matches unit {PRIMARY}, which has Restart=always" in check.stderr, check.stderr


def test_dry_run_stops_nothing_and_logs_would_stop_unit(box: Container) -> None:
    """Dry run: the game comes, "would stop unit secondary-sd.service" is logged, the unit stays active."""
    pid = restart_governor(box, dry_run=True)
    start_game(box)
    try:
        would = wait_for("unit_would_stop", lambda: events(box, "unit_would_stop", pid) or None, 30)
        print(f"[units-e2e] {would[0]}")
        assert f"would stop unit {SECONDARY}" in would[0], would[0]
        time.sleep(3)
        assert active(box, SECONDARY) == "active"
        assert not [m for m in box.journal(unit=SECONDARY) if "Stopping" in str(m.get("MESSAGE", ""))]
    finally:
        stop_game(box)


def test_game_makes_the_governor_stop_the_secondary_through_dbus(box: Container) -> None:
    """Free VRAM under the reserve: secondary-sd.service stopped by a systemd stop job; the primary untouched."""
    pid = restart_governor(box, dry_run=False)
    primary = box.show("MainPID", "NRestarts", unit=PRIMARY)
    time.sleep(2)
    assert active(box, SECONDARY) == "active", "no pressure yet: nothing may be stopped"
    start_game(box)
    wait_for("secondary-sd.service to be stopped", lambda: active(box, SECONDARY) == "inactive" or None, 30)
    stopped = events(box, "unit_stopped", pid)
    assert stopped and f"unit={SECONDARY}" in stopped[0] and "memory pressure" in stopped[0], stopped
    # systemd's own journal of the unit: a stop job (as `systemctl stop` makes), not a killed process.
    own = [str(e.get("MESSAGE", "")) for e in box.journal(unit=SECONDARY)]
    print(f"[units-e2e] governor: {stopped[0]}\n[units-e2e] journalctl -u {SECONDARY}: {own}")
    assert any(m.startswith("Stopping") and SECONDARY in m for m in own), own
    assert not any("code=killed" in m for m in own), own
    assert box.show("Result", unit=SECONDARY)["Result"] == "success"
    document = status_json(box)
    units = document["stopped_units"]
    assert isinstance(units, list) and [u["unit"] for u in units] == [SECONDARY]
    assert units[0]["resume"] is True and units[0]["resume_at_s"] is None  # the game still holds the reserve
    assert SECONDARY in box.sh("gpu-governor status", check=False).stdout
    assert box.show("MainPID", "NRestarts", unit=PRIMARY) == primary and active(box, PRIMARY) == "active"


def test_successor_of_a_killed_governor_resumes_the_unit_when_the_game_exits(box: Container) -> None:
    """kill -9 while the unit is stopped; the restarted governor starts it once the reserve stayed clear."""
    assert active(box, SECONDARY) == "inactive"
    primary = box.show("MainPID", "NRestarts", unit=PRIMARY)
    old = box.main_pid()
    box.sh(f"kill -KILL {old}")

    def new_pid() -> int | None:
        pid = box.main_pid()
        return pid if pid not in (0, old) and box.show("ActiveState")["ActiveState"] == "active" else None

    pid = wait_for("the governor to be restarted", new_pid, 30)
    wait_for("the saved unit to be loaded", lambda: events(box, "unit_stopped_earlier", pid) or None, 15)
    time.sleep(RESUME_AFTER_S + 2)
    assert active(box, SECONDARY) == "inactive", "resumed while the game still holds the reserve"
    stop_game(box)
    began = time.monotonic()
    wait_for("secondary-sd.service to be active again", lambda: active(box, SECONDARY) == "active" or None, 30)
    assert time.monotonic() - began >= RESUME_AFTER_S - 1.0
    # The unit turns active a moment before the governor's unit_started entry reaches the journal.
    started = wait_for("the unit_started event", lambda: events(box, "unit_started", pid) or None, 15)
    print(f"[units-e2e] resumed {time.monotonic() - began:.1f} s after the game exited: {started[:1]}")
    assert started and f"unit={SECONDARY}" in started[0] and "clear for" in started[0], started
    assert status_json(box)["stopped_units"] == []
    assert box.show("MainPID", "NRestarts", unit=PRIMARY) == primary and active(box, PRIMARY) == "active"


def test_terminate_on_restart_always_unit_is_a_detected_loop(box: Container) -> None:
    """looper.service (Restart=always) over budget: warned, 3 SIGTERMs and restarts, then a loop and no more signals."""
    pid = box.main_pid()
    box.sh(f"systemctl start {LOOPER}")
    loop = wait_for("unit_restart_loop", lambda: events(box, "unit_restart_loop", pid) or None, 60)
    print(f"[units-e2e] {loop[0]}")
    assert f"unit={LOOPER}" in loop[0]
    assert any(f"unit={LOOPER}" in m and "restart=always" in m for m in events(box, "kill_will_be_undone", pid))
    restarts = int(box.show("NRestarts", unit=LOOPER)["NRestarts"])
    assert restarts == 3, restarts
    time.sleep(6)  # several cooldowns: no further signal, so systemd restarts it no more
    assert int(box.show("NRestarts", unit=LOOPER)["NRestarts"]) == 3
    assert active(box, LOOPER) == "active"
    page = wait_for("the metrics page", box.metrics, 10)
    assert metric(page, "gpu_governor_unit_restart_loop", unit=LOOPER) == 1.0
    assert status_json(box)["restart_loops"] == [LOOPER]
    assert active(box, PRIMARY) == "active" and active(box, SECONDARY) == "active"
    box.sh(f"systemctl stop {LOOPER}")
