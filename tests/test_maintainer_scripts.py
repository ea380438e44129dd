"""The Debian package's prerm and postrm around a governor that left changes behind, run with ``sh``.

prerm runs with its three paths (the state directory, the command, systemd's run directory) pointed
into a temporary directory, a fake ``gpu-governor`` that records its arguments and exits with a
chosen status, and a fake ``systemctl``; postrm runs as dpkg runs it for another root
(``DPKG_ROOT``), with an ``rm`` that refuses any path outside that root. The state files are
written by the governor's own stores, so the scripts' checks read what the daemon writes.
tests/system/test_crash_restore_e2e.py runs both inside a booted Debian with the real package.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from governor.fanstate import FanControl
from governor.rules.units import PRESSURE, StoppedUnit
from governor.state import OriginalLimits
from governor.unitstate import StoppedUnitsStore

REPO = Path(__file__).resolve().parents[1]
DEBIAN = REPO / "packaging" / "debian"
UUID = "GPU-00000000-0000-0000-0000-000000000000"
PRERM_PATHS = {"state": "/var/lib/gpu-governor", "governor": "/usr/bin/gpu-governor", "booted": "/run/systemd/system"}


class Host:
    """A temporary directory standing in for the machine: the state directory, fake commands, a call log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "var/lib/gpu-governor"
        self.state.mkdir(parents=True)
        self.state.chmod(0o700)
        self.bin = root / "bin"
        self.bin.mkdir()
        self.calls = root / "calls"
        self.governor = self._fake("gpu-governor", 'echo "gpu-governor $*" >>"{calls}"\necho "restore says hello" >&2\n'
                                   'exit "${{FAKE_RC:-0}}"')  # fmt: skip
        self._fake("systemctl", 'echo "systemctl $*" >>"{calls}"\nexit "${{FAKE_SYSTEMCTL_RC:-3}}"')
        self._fake(
            "rm",
            'for a; do case "$a" in -*|"{root}"/*) ;; *) echo "rm refused $a" >>"{calls}"; exit 1;; esac; done\n'
            'exec /bin/rm "$@"',
        )

    def _fake(self, name: str, body: str) -> Path:
        path = self.bin / name
        path.write_text("#!/bin/sh\n" + body.format(calls=self.calls, root=self.root) + "\n")
        path.chmod(0o755)
        return path

    def logged(self) -> list[str]:
        """What the fake commands were asked, in order."""
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def record_lowered_limit(self) -> None:
        """The governor's own store records a lowered limit (200 W original) and two fans taken from the card."""
        assert OriginalLimits(self.state).remember(UUID, 200.0, 180.0)
        assert FanControl(self.state).remember(UUID, 2)

    def record_stopped_units(self, *units: str) -> None:
        """The governor's own store records ``units`` as stopped by it."""
        StoppedUnitsStore(self.state).save(
            {u: StoppedUnit(u, "secondary", PRESSURE, (UUID,), 1_700_000_000.0, 60.0) for u in units}
        )

    def _run(self, script: Path, args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        environ = {"PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8", **env}
        return subprocess.run(
            ["sh", str(script), *args], capture_output=True, text=True, timeout=60, check=False, env=environ
        )

    def prerm(
        self, *args: str, rc: int = 0, booted: bool = False, active: bool = False, dpkg_root: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The package's prerm with ARGS; the fake restore exits ``rc``; systemd runs when ``booted``, and
        the unit is active when ``active``."""
        text = (DEBIAN / "gpu-governor.prerm").read_text()
        booted_dir = self.root / "run-systemd-system"
        if booted:
            booted_dir.mkdir(exist_ok=True)
        ours = {"state": str(self.state), "governor": str(self.governor), "booted": str(booted_dir)}
        for name, path in PRERM_PATHS.items():
            line = f"{name}={path}"
            assert text.count(f"\n{line}") == 1, f"prerm no longer sets {line}"
            text = text.replace(f"\n{line}", f"\n{name}={ours[name]}")
        script = self.root / "prerm"
        script.write_text(text)
        env = {"FAKE_RC": str(rc), "FAKE_SYSTEMCTL_RC": "0" if active else "3"}
        if dpkg_root is not None:
            env["DPKG_ROOT"] = dpkg_root
        return self._run(script, args, env)

    def postrm(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The package's postrm with ARGS, as dpkg runs it on the root ``DPKG_ROOT`` (this directory)."""
        return self._run(DEBIAN / "gpu-governor.postrm", args, {"DPKG_ROOT": str(self.root)})


@pytest.fixture
def host(tmp_path: Path) -> Host:
    """A fresh stand-in machine under tmp_path."""
    return Host(tmp_path)


RESTORE = "gpu-governor restore"


class TestPrermRestoresWhatAStoppedGovernorLeft:
    @pytest.mark.parametrize(("booted", "how"), [(False, "no systemd"), (True, "unit inactive")])
    def test_remove_runs_the_restore_command_not_the_service(self, host: Host, booted: bool, how: str) -> None:
        """remove with a lowered limit recorded and no governor running (no systemd, or the unit inactive): prerm
        runs `gpu-governor restore` itself, never `systemctl start`, says so, and exits 0."""
        host.record_lowered_limit()
        done = host.prerm("remove", booted=booted)
        assert done.returncode == 0, done.stderr
        assert RESTORE in host.logged(), how
        assert not [c for c in host.logged() if c.startswith("systemctl") and "is-active" not in c]
        assert "restore says hello" in done.stderr
        assert "putting them back: gpu-governor restore" in done.stderr
        assert "put back every power limit and fan recorded in" in done.stderr

    def test_an_active_unit_is_left_to_the_removals_stop(self, host: Host) -> None:
        """The unit is active: the removal's stop restores, so prerm runs no restore (it would be refused)."""
        host.record_lowered_limit()
        done = host.prerm("remove", booted=True, active=True)
        assert done.returncode == 0 and host.logged() == ["systemctl --quiet is-active gpu-governor.service"]
        assert done.stderr == ""

    @pytest.mark.parametrize("action", ["upgrade", "deconfigure", "failed-upgrade"])
    def test_only_remove_restores(self, host: Host, action: str) -> None:
        """upgrade, deconfigure and failed-upgrade keep the package and its record: no restore, no word."""
        host.record_lowered_limit()
        done = host.prerm(action, "1.0")
        assert (done.returncode, host.logged(), done.stderr) == (0, [], "")

    def test_nothing_recorded_runs_nothing(self, host: Host) -> None:
        """An empty state directory (everything was restored, or nothing ever changed): no restore, no word."""
        (host.state / "original-limits.json").write_text('{\n  "original_power_limits_w": {},\n  "version": 2\n}\n')
        done = host.prerm("remove")
        assert (done.returncode, host.logged(), done.stderr) == (0, [], "")

    def test_dpkg_root_is_left_alone(self, host: Host) -> None:
        """dpkg working on another root (DPKG_ROOT): the GPUs are the host's, so nothing is run."""
        host.record_lowered_limit()
        done = host.prerm("remove", dpkg_root=str(host.root))
        assert (done.returncode, host.logged()) == (0, [])

    @pytest.mark.parametrize(
        ("rc", "said"),
        [
            (10, "nothing put back: another gpu-governor process holds"),
            (11, "some power limits or fans could not be put back"),
            (4, "gpu-governor restore failed (exit status 4"),
            (124, "gpu-governor restore failed (exit status 124; 124: it took longer than 120 s"),
        ],
    )
    def test_a_failed_restore_is_said_and_never_fails_the_removal(self, host: Host, rc: int, said: str) -> None:
        """Exit 10 (a daemon holds the state directory), 11 (something stays recorded), or any other status: a
        warning on stderr saying what it means and that the removal goes on; prerm exits 0."""
        host.record_lowered_limit()
        done = host.prerm("remove", rc=rc)
        assert done.returncode == 0, done.stderr
        assert said in done.stderr and "The removal goes on." in done.stderr
        if rc != 10:
            assert "stays recorded in" in done.stderr and "which a purge keeps" in done.stderr

    def test_a_missing_command_is_said_and_never_fails_the_removal(self, host: Host) -> None:
        """The command is gone (a half-installed package): exit status 127 said, prerm exits 0."""
        host.record_lowered_limit()
        host.governor.unlink()
        done = host.prerm("remove")
        assert done.returncode == 0 and "exit status 127" in done.stderr


class TestPrermNamesTheUnitsLeftStopped:
    def test_units_the_governor_stopped_are_named_with_the_way_to_start_them(self, host: Host) -> None:
        """remove while units are stopped by the governor (running or not): prerm names them, says nothing will
        resume them and how to start one; with no limit recorded it runs no restore."""
        host.record_stopped_units("comfyui.service", "batch.service")
        done = host.prerm("remove", booted=True, active=True)
        assert done.returncode == 0 and not [c for c in host.logged() if c.startswith(RESTORE)]
        assert "units the governor stopped stay stopped" in done.stderr
        assert "batch.service comfyui.service (start one with: systemctl start UNIT)" in done.stderr

    def test_a_forged_name_is_not_echoed(self, host: Host) -> None:
        """A name with a terminal escape in a corrupt file is not printed."""
        (host.state / "stopped-units.json").write_text('{\n  "units": {\n    "x\x1b[2J.service": {\n')
        done = host.prerm("remove")
        assert done.returncode == 0 and "\x1b" not in done.stderr and "stay stopped" not in done.stderr


class TestPostrmPurge:
    def test_purge_removes_the_state_and_runtime_directories(self, host: Host) -> None:
        """purge with nothing left recorded: DPKG_ROOT's /var/lib/gpu-governor and /run/gpu-governor go, nothing
        outside DPKG_ROOT is touched (before, the host's own directories were removed)."""
        host.record_stopped_units("comfyui.service")
        (host.root / "run/gpu-governor").mkdir(parents=True)
        done = host.postrm("purge")
        assert (done.returncode, host.logged()) == (0, []), done.stderr
        assert not host.state.exists() and not (host.root / "run/gpu-governor").exists()

    def test_purge_keeps_a_record_that_was_not_put_back(self, host: Host) -> None:
        """purge while a lowered limit is still recorded (the restore exited 11): the state directory is kept,
        with a warning saying why and what to do; the runtime directory still goes."""
        host.record_lowered_limit()
        (host.root / "run/gpu-governor").mkdir(parents=True)
        done = host.postrm("purge")
        assert done.returncode == 0, done.stderr
        assert OriginalLimits(host.state).items() == [(UUID, 200.0)]
        assert FanControl(host.state).items() == [(UUID, 2)]
        assert not (host.root / "run/gpu-governor").exists()
        assert f"kept {host.state}" in done.stderr and "reinstall gpu-governor" in done.stderr

    @pytest.mark.parametrize("action", ["remove", "upgrade", "disappear"])
    def test_anything_but_purge_keeps_the_state(self, host: Host, action: str) -> None:
        """remove, upgrade, disappear: the state directory stays as it is."""
        host.record_stopped_units("comfyui.service")
        done = host.postrm(action)
        assert done.returncode == 0 and (host.state / "stopped-units.json").exists()


@pytest.mark.parametrize("name", ["gpu-governor.prerm", "gpu-governor.postrm"])
def test_the_scripts_parse_once_debhelper_fills_them_in(name: str) -> None:
    """Each script names #DEBHELPER# once, on a line of its own (debhelper replaces every occurrence: one in a
    comment broke the built prerm's syntax), and parses as POSIX sh with that line filled in."""
    text = (DEBIAN / name).read_text()
    assert text.count("#DEBHELPER#") == 1 and "\n#DEBHELPER#\n" in text
    filled = text.replace("#DEBHELPER#", "if true; then\n    :\nfi")
    shell = "/bin/dash" if os.path.exists("/bin/dash") else "sh"
    subprocess.run([shell, "-n"], input=filled, text=True, check=True, timeout=30)
