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

The last two tests remove the package after a crash whose ``ExecStopPost=`` restore did not run
(a runtime drop-in empties it, standing for a restore that could not put everything back): the
package's prerm puts the card back with ``gpu-governor restore`` itself, without starting the unit
(``apt-get remove``), and when that restore cannot put back everything (a recorded GPU that is
gone, exit 11) the removal goes on and ``dpkg --purge`` keeps the record.
"""

from __future__ import annotations

import json
import re
import shlex
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
STOPPED_UNITS = f"{STATE_DIR}/stopped-units.json"
NO_RESTORE = f"/run/systemd/system/{UNIT}.d/no-restore.conf"
GONE_UUID = "GPU-gone-0"
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


# --------------------------------------------------------------------------- package removal


def crash_without_restore(box: Container) -> None:
    """A run killed with SIGKILL whose ExecStopPost= restore does not run (a runtime drop-in empties it) and that
    is not restarted: the card stays changed and recorded, the unit failed."""
    box.write(NO_RESTORE, "[Service]\n# test only: no restore after the stop, no restart\nExecStopPost=\nRestart=no\n")
    box.sh(f"systemctl daemon-reload && systemctl reset-failed {UNIT} && systemctl restart {UNIT}", timeout=90)
    kill_9_when_changed(box)
    wait_for("the killed unit to fail", lambda: box.show("ActiveState")["ActiveState"] == "failed" or None, 30)
    assert changed(box), "the killed governor's changes were restored: the drop-in did not take"


def journal_cursor(box: Container) -> str:
    """The journal's current end, to read only what comes after it."""
    out = box.sh("journalctl -n 0 --show-cursor --no-pager").stdout
    return out.strip().rsplit("-- cursor: ", 1)[1]


def unit_starts_after(box: Container, cursor: str) -> list[str]:
    """What says the unit was started after ``cursor``: systemd's start jobs and the daemon's own start events."""
    entries = box.journal(f"--after-cursor={shlex.quote(cursor)}")
    return [
        str(e.get("MESSAGE"))
        for e in entries
        if e.get("JOB_TYPE") == "start" or e.get("EVENT") in ("governor_starting", "governor_ready")
    ]


def remove_package(box: Container, command: str) -> str:
    """Run ``command`` (apt-get or dpkg removing the package), which must succeed; everything it printed."""
    done = box.sh(f"DEBIAN_FRONTEND=noninteractive {command}", timeout=300)
    print(done.stdout + done.stderr)
    return done.stdout + done.stderr


def test_apt_remove_after_a_crash_restores_without_starting_the_unit(box: Container) -> None:
    """`apt-get remove` with the governor killed and its changes recorded: prerm runs `gpu-governor restore`, the
    card is back at its default with its fans under its own control and nothing recorded; the unit was never
    started (no start job, no daemon start in the journal); a unit the governor had stopped is named."""
    crash_without_restore(box)
    stopped = {
        "units": {
            "comfyui.service": {
                "class": "secondary",
                "gpus": [SIM_UUID],
                "reason": "memory_pressure",
                "resume_after_s": 60.0,
                "stopped_at_s": 1700000000.0,
            }
        },
        "version": 1,
    }
    box.write(STOPPED_UNITS, json.dumps(stopped, indent=2, sort_keys=True) + "\n", mode=0o600)
    cursor = journal_cursor(box)
    said = remove_package(box, "apt-get -o Dpkg::Use-Pty=0 remove -y gpu-governor")
    assert unit_starts_after(box, cursor) == []
    assert_restored(box)
    assert not box.exists("/usr/bin/gpu-governor")
    assert "putting them back: gpu-governor restore" in said
    assert "put back every power limit and fan recorded in /var/lib/gpu-governor" in said
    assert '"event": "power_limit_restored"' in said and '"event": "units_left_stopped"' in said
    assert "units the governor stopped stay stopped" in said and "comfyui.service" in said
    box.sh(f"rm -f {STOPPED_UNITS}")


def test_dpkg_purge_keeps_a_record_that_could_not_be_put_back(box: Container) -> None:
    """Reinstalled, then killed again with a recorded GPU that is gone: `dpkg --purge` succeeds, prerm puts the
    present card back and warns that the rest stays recorded (exit 11), the unit is not started, and postrm keeps
    the state directory with the gone GPU's original instead of deleting the only record of it."""
    box.sh("DEBIAN_FRONTEND=noninteractive dpkg -i /var/tmp/gpu-governor.deb", timeout=120)
    crash_without_restore(box)
    add_gone = (
        "import json\n"
        f"path = {ORIGINALS!r}\n"
        "doc = json.load(open(path))\n"
        f"doc['original_power_limits_w'][{GONE_UUID!r}] = 250.0\n"
        "open(path, 'w').write(json.dumps(doc, indent=2, sort_keys=True) + '\\n')\n"
    )
    box.sh("python3 -", stdin=add_gone)
    cursor = journal_cursor(box)
    said = remove_package(box, "dpkg --purge gpu-governor")
    assert unit_starts_after(box, cursor) == []
    assert box.exists(ORIGINALS), "the purge deleted the record of the gone GPU's original limit"
    assert json.loads(box.read(ORIGINALS))["original_power_limits_w"] == {GONE_UUID: 250.0}
    assert json.loads(box.read(FANS))["manual_fans"] == {}
    limit_w, fans = hardware(box)
    assert (limit_w, fans) == (DEFAULT_W, {})
    assert not box.exists("/etc/gpu-governor")  # the purge itself went through
    assert "some power limits or fans could not be put back" in said and "The removal goes on." in said
    assert f"kept {STATE_DIR}" in said
    box.sh(f"rm -rf {STATE_DIR} {NO_RESTORE} && systemctl daemon-reload")
