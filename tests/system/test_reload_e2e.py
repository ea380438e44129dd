"""`systemctl reload gpu-governor` under a real systemd 252 (Debian 12, tests/system/nspawn.py).

Debian 12's systemd has no Type=notify-reload (253): with ``ExecReload=/bin/kill -HUP $MAINPID``
the reload job ends as soon as kill(1) has sent the signal, before the daemon has read the file,
and a refused file looks like a successful reload. These tests make the daemon's reload slow on
purpose (the file keeps being touched for a few seconds, and a reload waits for the file to
settle), run ``systemctl reload``, and as soon as it returns send a marker entry to the journal
through the native socket the daemon logs through too: the journal's order (sequence numbers)
then says whether the daemon's ``config_reloaded`` / ``config_reload_failed`` entry came before
``systemctl reload`` returned. No wall-clock duration is asserted.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.system.nspawn import (
    CONFIG,
    UNIT,
    Container,
    active,
    booted,
    check_prerequisites,
    metric,
    sim_config,
    wait_for,
)

pytestmark = pytest.mark.system

DROP_IN = textwrap.dedent(
    """\
    [Unit]
    # test only: the test restarts the unit more often than a crash loop would
    StartLimitIntervalSec=0

    [Service]
    ExecStart=
    ExecStart=/usr/bin/gpu-governor run --simulate
    RestartSec=1s
    """
)

PROBE = "/usr/local/bin/gg-reload-probe"
PROBE_SCRIPT = textwrap.dedent(
    f"""\
    #!/bin/sh
    # gg-reload-probe MARK TOUCHES BUSY: keep touching the config TOUCHES times, 0.2 s apart, in
    # the background (a reload waits until the file has settled); when BUSY is not 0, stop the
    # daemon for BUSY seconds (a daemon busy with a long tick when the SIGHUP comes); run
    # `systemctl reload`, then at once log MARK to the journal through its native socket and read
    # the reload counters from the metrics; prints one JSON line.
    (i=0; while [ $i -lt "$2" ]; do touch {CONFIG}; sleep 0.2; i=$((i + 1)); done) &
    toucher=$!
    if [ "$3" != 0 ]; then
        pid=$(systemctl show -p MainPID --value {UNIT})
        kill -STOP "$pid"
        (sleep "$3"; kill -CONT "$pid") &
    fi
    systemctl reload {UNIT} 2>/run/gg-reload-probe.err
    rc=$?
    python3 - "$1" "$rc" <<'EOF'
    import json, re, socket, sys, urllib.request
    mark, rc = sys.argv[1], int(sys.argv[2])
    entry = f"MESSAGE=systemctl reload returned {{rc}}\\nSYSLOG_IDENTIFIER=gg-reload-probe\\nGG_MARK={{mark}}\\n"
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(entry.encode(), "/run/systemd/journal/socket")
    page = urllib.request.urlopen("http://127.0.0.1:9847/metrics", timeout=5).read().decode()
    counts = dict(re.findall(r'^gpu_governor_config_reloads_total\\{{result="(\\w+)"\\}} (\\S+)$', page, re.M))
    print(json.dumps({{"rc": rc, "reloads": {{k: float(v) for k, v in counts.items()}},
                      "stderr": open("/run/gg-reload-probe.err").read()}}))
    EOF
    wait
    """
)


def make_config(step_down_at_c: float = 75.0, hot_c: float | str = 80.0) -> str:
    """A simulated RTX 4070; ``step_down_at_c`` shows in the config_reloaded entry, ``hot_c`` may be made invalid."""
    hot = json.dumps(hot_c) if isinstance(hot_c, str) else hot_c
    sections = f"[thermal]\nhot_c = {hot}\n\n[power]\nstep_down_at_c = {step_down_at_c}\nstep_up_at_c = 65.0\n"
    return sim_config("tests/system/test_reload_e2e.py", "idle", sections, metrics=True)


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest) -> Iterator[Container]:
    """A booted Debian 12 with the .deb installed and the governor running on a simulated GPU."""
    check_prerequisites()
    with booted("reload", DROP_IN, lambda: bool(request.session.testsfailed)) as container:
        container.sh("dpkg -i /var/tmp/gpu-governor.deb", timeout=120)
        container.write(CONFIG, make_config())
        container.write(PROBE, PROBE_SCRIPT, mode=0o755)
        container.sh(f"systemctl restart {UNIT}", timeout=90)
        wait_for("the metrics endpoint", container.metrics, 30)
        yield container


@dataclass(frozen=True)
class Reload:
    """What one probed ``systemctl reload`` gave: its exit code, stderr, the reload counters read
    right after it returned, and the journal entries logged from just before it until its marker."""

    rc: int
    stderr: str
    reloads: dict[str, float]
    entries: list[dict[str, Any]]
    mark: str

    def seqnum(self, entry: dict[str, Any]) -> int:
        """The entry's sequence number in the journal (from its cursor: 252 has no __SEQNUM field)."""
        match = re.search(r"(?:^|;)i=([0-9a-f]+)", entry["__CURSOR"])
        assert match is not None, entry["__CURSOR"]
        return int(match.group(1), 16)

    def marker(self) -> dict[str, Any]:
        return next(e for e in self.entries if e.get("GG_MARK") == self.mark)

    def daemon(self, event: str) -> list[dict[str, Any]]:
        """The daemon's ``event`` entries (native: EVENT= set) in this window."""
        return [e for e in self.entries if e.get("EVENT") == event and e.get("_SYSTEMD_UNIT") == UNIT]


def probe_reload(box: Container, mark: str, touches: int = 15, busy: int = 0) -> Reload:
    """Run the probe (a slow reload: the file is touched for ``touches`` x 0.2 s; with ``busy``, the
    daemon is stopped for that many seconds as the reload is asked for), then wait until the daemon
    has logged the reload's outcome, and return the journal from before it onwards."""
    shown = box.sh("journalctl --no-pager -n 0 --show-cursor").stdout.strip().splitlines()
    cursor = shown[-1].removeprefix("-- cursor: ")
    result = json.loads(box.sh(f"{PROBE} {mark} {touches} {busy}", timeout=120).stdout.strip().splitlines()[-1])

    def window() -> list[dict[str, Any]] | None:
        out = box.sh(f"journalctl --no-pager -o json --after-cursor='{cursor}'").stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        outcome = [e for e in entries if e.get("EVENT") in ("config_reloaded", "config_reload_failed")]
        marked = [e for e in entries if e.get("GG_MARK") == mark]
        return entries if outcome and marked else None

    entries = wait_for("the reload's outcome and the probe's marker in the journal", window, 60)
    return Reload(result["rc"], result["stderr"], result["reloads"], entries, mark)


def reload_counts(box: Container) -> dict[str, float]:
    page = box.metrics()
    assert page is not None
    return {r: metric(page, "gpu_governor_config_reloads_total", result=r) or 0.0 for r in ("success", "failure")}


def test_reload_returns_after_the_daemon_applied_the_file(box: Container) -> None:
    """A valid file, the daemon busy for 2 s: exit 0 after its config_reloaded entry; the metrics count it at once."""
    pid = box.main_pid()
    before = reload_counts(box)
    box.write(CONFIG, make_config(step_down_at_c=74.0))
    reload = probe_reload(box, "applied-74", busy=2)
    print(f"[reload-e2e] applied: rc={reload.rc} counters after return={reload.reloads} stderr={reload.stderr!r}")
    applied = reload.daemon("config_reloaded")
    assert applied, "the daemon logged no config_reloaded"
    assert applied[0]["STEP_DOWN_AT_C"] == "74.0"
    assert reload.seqnum(applied[0]) < reload.seqnum(reload.marker()), (
        "systemctl reload returned before the daemon had applied the new config"
    )
    assert reload.rc == 0, reload.stderr
    assert reload.reloads.get("success") == before["success"] + 1, "the metrics read right after lag behind"
    assert box.main_pid() == pid


def test_reload_of_a_refused_file_fails_and_keeps_the_daemon(box: Container) -> None:
    """An invalid file: `systemctl reload` exits non-zero after config_reload_failed; the daemon stays, same PID."""
    pid = box.main_pid()
    before = reload_counts(box)
    box.write(CONFIG, make_config(step_down_at_c=73.0, hot_c="very"))
    reload = probe_reload(box, "refused")
    print(f"[reload-e2e] refused: rc={reload.rc} counters after return={reload.reloads} stderr={reload.stderr!r}")
    refused = reload.daemon("config_reload_failed")
    assert refused, "the daemon logged no config_reload_failed"
    assert reload.seqnum(refused[0]) < reload.seqnum(reload.marker()), (
        "systemctl reload returned before the daemon had refused the new config"
    )
    assert reload.rc != 0, "a refused config must fail the reload job"
    assert reload.reloads.get("failure") == before["failure"] + 1
    assert active(box, UNIT) == "active"
    assert box.main_pid() == pid
    # What the reload command printed is in the unit's journal (stderr lines, not the daemon's
    # native entries), naming the file and the key.
    said = [str(e.get("MESSAGE")) for e in reload.entries if e.get("_SYSTEMD_UNIT") == UNIT and not e.get("EVENT")]
    assert f"gpu-governor: reload: process {pid} refused the new configuration and keeps running the old one" in said
    assert any(m.startswith(f"gpu-governor: config error: {CONFIG}: thermal.hot_c: expected") for m in said), said


def test_reload_during_a_reload_in_flight_waits_for_one_that_read_the_new_file(box: Container) -> None:
    """`systemctl reload` while another SIGHUP's reload settles returns after a reload that read its file (72)."""
    box.write(CONFIG, make_config(step_down_at_c=75.0))
    pid = box.main_pid()
    # The stranger's reload: the file is touched for 3 s, so it settles long after the next write.
    box.sh(f"(i=0; while [ $i -lt 15 ]; do touch {CONFIG}; sleep 0.2; i=$((i + 1)); done) >/dev/null 2>&1 &"
           f" sleep 0.5; kill -HUP {pid}")  # fmt: skip
    box.write(CONFIG, make_config(step_down_at_c=72.0))
    reload = probe_reload(box, "during-72", touches=5)
    print(f"[reload-e2e] during: rc={reload.rc} stderr={reload.stderr!r}")
    assert reload.rc == 0, reload.stderr
    marker = reload.seqnum(reload.marker())
    before_return = [e for e in reload.daemon("config_reloaded") if reload.seqnum(e) < marker]
    assert before_return, "systemctl reload returned before any reload was applied"
    assert before_return[-1]["STEP_DOWN_AT_C"] == "72.0"
    assert active(box, UNIT) == "active"
