"""The unit's ``ExecStopPost=`` restore under a real systemd (tests/system/nspawn.py): a governor killed with
SIGKILL until systemd gives up restarting it leaves no lowered limit and no fan in manual control.

A Debian 12 container booted with systemd-nspawn runs the .deb's gpu-governor.service on a simulated
RTX 4070 in the hot scenario with fans on a curve. The simulated card's "hardware" (its power limit,
the fans it runs by hand) lives in a file under the state directory, so it outlives the daemon
process as a real card's settings would: that file, the governor's own state files and the journal
are what "restored" means here. On a real GPU the same code path writes NVML instead
(tests/test_restore.py runs it against the fake NVML); that the driver accepts the restore's writes
from inside the sandbox after a crash is checked on a real GPU only.

A test-only drop-in restarts within a second and gives up after two starts in five minutes
(``StartLimitBurst=2``), so the second SIGKILL is the last run: no successor restores anything.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator

import pytest

from tests.system.nspawn import (
    CONFIG,
    HOT_POWER,
    SIM_STATE,
    STATE_DIR,
    UNIT,
    Container,
    Event,
    booted,
    check_prerequisites,
    sim_config,
    wait_for,
)

pytestmark = pytest.mark.system

SIM_UUID = "GPU-sim-rtx4070-0"
DEFAULT_W = 200.0
FANS = f"{STATE_DIR}/fan-control.json"
ORIGINALS = f"{STATE_DIR}/original-limits.json"
DROP_IN = textwrap.dedent(
    """\
    [Unit]
    # test only: give up after the second start in five minutes
    StartLimitIntervalSec=300
    StartLimitBurst=2

    [Service]
    ExecStart=
    ExecStart=/usr/bin/gpu-governor run --simulate
    # test only: restart quickly
    RestartSec=1s
    LimitCORE=0
    """
)


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest) -> Iterator[Container]:
    """A booted Debian 12 with the .deb installed, governing a hot simulated GPU with fans on a curve."""
    check_prerequisites()
    with booted("crash-restore-e2e", DROP_IN, lambda: bool(request.session.testsfailed), lines=250) as container:
        yield container


def make_config() -> str:
    """The simulated RTX 4070, hot, 20x real time, fans on a curve, its hardware kept under the state directory."""
    fans = '\n[fan]\nmode = "curve"\nmax_percent = 75.0\n'
    return sim_config("tests/system/test_crash_restore_e2e.py", "hot", HOT_POWER + fans, time_scale=20.0)


def hardware(box: Container) -> tuple[float, dict[str, float]]:
    """The simulated card's power limit (W) and the fans it runs by hand (percent by UUID; empty: its own control)."""
    document = json.loads(box.read(SIM_STATE))
    return float(document["power_limits_w"][SIM_UUID]), dict(document.get("manual_fans_percent", {}))


def changed(box: Container) -> bool:
    """The daemon lowered the limit and took the fans, and recorded both."""
    if not box.exists(SIM_STATE) or not box.exists(FANS):
        return False
    limit_w, fans = hardware(box)
    return limit_w < DEFAULT_W and SIM_UUID in fans and SIM_UUID in json.loads(box.read(FANS))["manual_fans"]


def stop_post(box: Container) -> dict[str, str]:
    """The last ExecStopPost= run as systemd reports it: its pid, how it ended (code) and its status."""
    shown = box.show("ExecStopPost")["ExecStopPost"]
    found = dict(re.findall(r"(pid|code|status)=([^ ;}]+)", shown))
    assert {"pid", "code", "status"} <= set(found), shown
    return found


def events_of(box: Container, pid: int) -> list[Event]:
    return [e for e in box.daemon_events() if e.pid == pid]


def restore_runs(box: Container) -> list[list[Event]]:
    """The journal entries of each restore that found something to do (a process that logged restore_starting),
    oldest first. (systemd forgets the last ExecStopPost= run's pid once the unit starts again.)"""
    entries = box.daemon_events()
    pids = list(dict.fromkeys(e.pid for e in entries if e.event == "restore_starting"))
    return [[e for e in entries if e.pid == pid] for pid in pids]


def assert_restored(box: Container) -> None:
    """The card is back at its default limit with its fans under its own control, and nothing is left recorded."""
    limit_w, fans = hardware(box)
    assert (limit_w, fans) == (DEFAULT_W, {}), box.read(SIM_STATE)
    assert json.loads(box.read(ORIGINALS))["original_power_limits_w"] == {}
    assert json.loads(box.read(FANS))["manual_fans"] == {}


def kill_9_when_changed(box: Container) -> int:
    """Wait until the running daemon changed the card, then SIGKILL it; its pid."""
    wait_for("the daemon to lower the limit and take the fans", lambda: changed(box), 90, interval=0.5)
    pid = box.main_pid()
    assert pid > 0
    box.sh(f"kill -KILL {pid}")
    return pid


def test_install_and_govern(box: Container) -> None:
    """Installed from the .deb; the shipped unit has the ExecStopPost= restore; the daemon governs the hot card."""
    box.sh("dpkg -i /var/tmp/gpu-governor.deb", timeout=120)
    unit = box.read(f"/lib/systemd/system/{UNIT}")
    assert "\nExecStopPost=-/usr/bin/gpu-governor restore --quiet\n" in unit
    box.write(CONFIG, make_config())
    box.sh(f"systemctl restart {UNIT}", timeout=90)
    wait_for("the daemon to lower the limit and take the fans", lambda: changed(box), 90, interval=0.5)


def test_restore_by_hand_refuses_while_the_daemon_runs(box: Container) -> None:
    """`gpu-governor restore` while the daemon runs: exit 10 naming its pid, the card and the records untouched."""
    pid = box.main_pid()
    result = box.sh("gpu-governor restore", check=False)
    assert result.returncode == 10, result.stdout + result.stderr
    assert f"gpu-governor process {pid}" in result.stderr and "nothing restored" in result.stderr
    assert changed(box) and box.main_pid() == pid  # still lowered and recorded: nothing was put back
    assert json.loads(box.read(ORIGINALS))["original_power_limits_w"] == {SIM_UUID: DEFAULT_W}


def test_sigkill_until_systemd_gives_up_leaves_everything_restored(box: Container) -> None:
    """Two SIGKILLs: each time ExecStopPost= puts the limit and the fans back (journal, from its own pid, in the
    unit's sandbox, told the run ended by a signal); after the second systemd gives up (start request repeated
    too quickly) and the card stays restored with nothing recorded."""
    box.sh(f"systemctl reset-failed {UNIT}")  # the install and the test's restart counted as starts
    box.sh(f"systemctl restart {UNIT}", timeout=90)
    first = kill_9_when_changed(box)

    def restarted() -> int | None:
        props = box.show("MainPID", "ActiveState", "SubState")
        pid = int(props["MainPID"])
        running = props["ActiveState"] == "active" and props["SubState"] == "running"
        return pid if running and pid not in (0, first) else None

    second = wait_for("systemd to restart the killed daemon", restarted, 60)
    (restored,) = restore_runs(box)  # the clean restarts before found nothing and logged nothing
    assert restored[0].pid not in (first, second)
    names = [e.event for e in restored]
    assert names.count("fan_control_restored") == 2 and "power_limit_restored" in names, names
    assert names[-1] == "restore_finished", names
    (starting,) = [e for e in restored if e.event == "restore_starting"]
    assert (starting.fields.get("SERVICE_RESULT"), starting.fields.get("EXIT_STATUS")) == ("signal", "KILL")
    limit = next(e for e in restored if e.event == "power_limit_restored")
    assert (limit.fields["RULE"], limit.fields["OUTCOME"], float(limit.fields["TO_W"])) == (
        "restore_after_crash",
        "applied",
        DEFAULT_W,
    )
    daemon_entries = events_of(box, first)
    assert daemon_entries, "no journal entry of the killed daemon"
    assert restored[0].fields["_SYSTEMD_UNIT"] == UNIT
    assert restored[0].fields["_CAP_EFFECTIVE"] == daemon_entries[0].fields["_CAP_EFFECTIVE"], "not the unit's sandbox"

    kill_9_when_changed(box)  # the second start's run: its kill is the last, systemd does not restart it

    def failed() -> dict[str, str] | None:
        props = box.show("ActiveState", "Result")
        return props if props["ActiveState"] == "failed" else None

    props = wait_for("systemd to give up restarting", failed, 60)
    assert props["Result"] == "signal", props  # systemd 252 keeps the run's own result when it gives up
    gave_up = [e for e in box.journal() if "Start request repeated too quickly" in str(e.get("MESSAGE"))]
    assert gave_up, "systemd did not log that it gave up restarting"
    last = stop_post(box)  # no start since: systemd still shows this run
    assert (last["code"], last["status"]) == ("exited", "0"), last
    assert [run[0].pid for run in restore_runs(box)][-1] == int(last["pid"])
    assert [e.event for e in events_of(box, int(last["pid"]))][-1] == "restore_finished"
    assert_restored(box)


def test_clean_stop_runs_the_restore_as_a_silent_no_op(box: Container) -> None:
    """`systemctl stop` after the daemon governed: the daemon restores, ExecStopPost= exits 0 and logs nothing."""
    box.sh(f"systemctl reset-failed {UNIT}")
    box.sh(f"systemctl start {UNIT}", timeout=90)
    wait_for("the daemon to lower the limit and take the fans", lambda: changed(box), 90, interval=0.5)
    box.sh(f"systemctl stop {UNIT}", timeout=90)
    props = box.show("ActiveState", "Result")
    assert (props["ActiveState"], props["Result"]) == ("inactive", "success"), props
    post = stop_post(box)
    assert (post["code"], post["status"]) == ("exited", "0"), post
    assert events_of(box, int(post["pid"])) == []
    assert_restored(box)
