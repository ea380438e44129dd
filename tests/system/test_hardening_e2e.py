"""The hardened unit against the jobs it must still do, under a real systemd (tests/system/nspawn.py).

A Debian 12 container booted with systemd-nspawn runs the .deb's gpu-governor.service on a
simulated RTX 4070 whose GPU processes are real processes of a logged-in user (uid 1000),
given VRAM by a ``[simulation] processes_file`` (matched by cgroup). One class signals
everything that user runs over 256 MiB: a copy of sleep named ``hog`` must be terminated,
and a copy named ``Xorg`` under /usr/local/bin must not be, because the built-in protection
of display servers needs the governor to read the process's /proc/PID/exe, which the kernel
lets root read only with CAP_SYS_PTRACE when the process belongs to another user.

Also here, without a container: the unit's device allow list, resolved the way systemd
resolves it when the unit starts before the NVIDIA driver is loaded (--wait-for-driver).
systemd-nspawn containers do not enforce DevicePolicy= (no device cgroup), so that one
is checked by resolving the list, not by opening a device.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Iterator

import pytest

from tests.system.nspawn import (
    CONFIG,
    RESTART_QUICKLY,
    STATE_DIR,
    UNIT,
    UNIT_FILE,
    Container,
    active,
    booted,
    check_prerequisites,
    sim_config,
    wait_for,
)

pytestmark = pytest.mark.system

GIB = 2**30
PROCESSES = "/etc/gpu-governor/sim-processes.json"
USER, UID = "gguser", 1000
XORG, HOG, LLAMA = "gg-xorg.service", "gg-hog.service", "gg-llama.service"
LLAMA_EXE = f"/home/{USER}/llama.cpp/llama-server"


def make_config() -> str:
    """Everything uid 1000 runs is in one class that terminates at once above 256 MiB."""
    return sim_config(
        "tests/system/test_hardening_e2e.py",
        "idle",
        f"""\
        [vram]
        reserve = "2GiB"
        cooldown_s = 1.0

        [[class]]
        name = "llama"
        budget = "8GiB"
        priority = 20
        action = "observe"
        match = {{ exe = "*/llama-server" }}

        [[class]]
        name = "user-jobs"
        budget = "256MiB"
        priority = 10
        action = "terminate"
        grace_s = 0.0
        kill_after_s = 5.0
        match = {{ user = "{USER}" }}
        """,
        metrics=True,
        top='runtime_dir = "/run/gpu-governor"\n',
        simulation=f'processes_file = "{PROCESSES}"\n',
    )


def processes_file() -> str:
    """Each of the user's units holds 1 GiB on GPU 0."""
    entries = [
        {"gpu": 0, "cgroup": f"/system.slice/{unit}", "used_bytes": GIB, "name": name}
        for unit, name in ((XORG, "Xorg"), (HOG, "hog"), (LLAMA, "llama-server"))
    ]
    return json.dumps({"processes": entries})


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest) -> Iterator[Container]:
    """A booted Debian 12 with the .deb installed and a user account with uid 1000."""
    check_prerequisites()
    with booted("hardening-e2e", RESTART_QUICKLY, lambda: bool(request.session.testsfailed)) as container:
        yield container


def process_rows(box: Container) -> list[dict[str, object]]:
    """The rows of the governor's processes.json (empty before the first one is written)."""
    if not box.exists("/run/gpu-governor/processes.json"):
        return []
    rows: list[dict[str, object]] = json.loads(box.read("/run/gpu-governor/processes.json"))["processes"]
    return rows


def test_users_compositor_keeps_its_protection_under_the_hardened_unit(box: Container) -> None:
    """Another user's /usr/local/bin/Xorg is protected (its exe is readable) while that user's hog is terminated."""
    box.sh("dpkg -i /var/tmp/gpu-governor.deb", timeout=120)
    box.sh(f"useradd --uid {UID} --create-home {USER}")
    box.sh("install -o root -g root -m 0755 /bin/sleep /usr/local/bin/Xorg")
    box.sh("install -o root -g root -m 0755 /bin/sleep /usr/local/bin/hog")
    box.sh(f"install -D -o {USER} -g {USER} -m 0755 /bin/sleep {LLAMA_EXE}")
    box.write(PROCESSES, processes_file())
    box.write(CONFIG, make_config())
    for unit, exe in ((XORG, "/usr/local/bin/Xorg"), (HOG, "/usr/local/bin/hog"), (LLAMA, LLAMA_EXE)):
        box.sh(f"systemd-run --unit={unit} -p User={USER} {exe} infinity")
    xorg_pid = int(box.show("MainPID", unit=XORG)["MainPID"])
    box.sh(f"systemctl restart {UNIT}", timeout=90)
    assert box.show("ActiveState")["ActiveState"] == "active"

    wait_for("the hog to be terminated", lambda: active(box, HOG) != "active" or None, 30)
    rows = wait_for(
        "processes.json to list the user's Xorg",
        lambda: [r for r in process_rows(box) if r["pid"] == xorg_pid] or None,
        15,
    )
    assert rows[0]["user"] == USER, rows
    protected = str(rows[0]["protected"])
    assert protected.startswith("protected executable 'Xorg'"), rows
    time.sleep(3)  # several more ticks, each of which would have signalled an unprotected Xorg
    assert active(box, XORG) == "active"
    assert int(box.show("MainPID", unit=XORG)["MainPID"]) == xorg_pid
    signalled = [
        e
        for e in box.daemon_events()
        if e.fields.get("PID") == str(xorg_pid) and e.event in ("process_signalled", "process_signal_failed")
    ]
    assert signalled == [], [e.message for e in signalled]


def test_exe_class_matches_a_binary_in_a_home_directory_the_unit_hides(box: Container) -> None:
    """Under ProtectHome=yes the governor cannot see /home, yet `exe = "*/llama-server"` matches the user's
    llama-server there: the path is looked up as the host sees it (/proc/1/root), the same file."""
    llama_pid = int(box.show("MainPID", unit=LLAMA)["MainPID"])
    assert llama_pid > 0
    rows = wait_for(
        "processes.json to list the llama-server",
        lambda: [r for r in process_rows(box) if r["pid"] == llama_pid] or None,
        15,
    )
    assert rows[0]["class"] == "llama", rows
    assert active(box, LLAMA) == "active"
    hidden = box.sh(f"systemd-run --wait --pipe -p ProtectHome=yes test -e {LLAMA_EXE}", check=False)
    assert hidden.returncode != 0  # ProtectHome=yes hides it from a unit's own view


def test_documentation_links_of_the_installed_unit_resolve(box: Container) -> None:
    """Every file:// link in the installed unit's Documentation= names a file the package installed."""
    links = box.show("Documentation")["Documentation"].split()
    files = [link.removeprefix("file://") for link in links if link.startswith("file://")]
    assert files, links
    missing = [path for path in files if not box.exists(path)]
    assert missing == [], f"Documentation= links to missing files: {missing}"


def test_installed_files_are_root_owned_and_not_writable_by_others(box: Container) -> None:
    """The config, the unit, the code and the state directory: root-owned, none writable by group or others."""
    paths = [CONFIG, "/etc/gpu-governor", f"/lib/systemd/system/{UNIT}", "/usr/bin/gpu-governor", STATE_DIR]
    listing = box.sh("stat -c '%u %a %n' " + " ".join(paths)).stdout.splitlines()
    listing += box.sh("find /usr/lib/gpu-governor -printf '%U %m %p\\n'").stdout.splitlines()
    bad = [line for line in listing if line.split()[0] != "0" or int(line.split()[1], 8) & 0o022]
    assert bad == [], bad
    assert box.sh(f"stat -c %a {STATE_DIR}").stdout.strip() == "700"


# --------------------------------------------------------------------------- no container


def unit_values(key: str) -> list[str]:
    """Every value of ``key=`` in the shipped unit's [Service] section, in order."""
    service = UNIT_FILE.read_text().split("[Service]", 1)[1].split("[Install]", 1)[0]
    return [line.split("=", 1)[1].strip() for line in service.splitlines() if line.startswith(key + "=")]


def allowed_char_majors(proc_devices: str) -> set[int]:
    """The character-device majors the unit's DeviceAllow= grants, resolved as systemd resolves them
    when the unit starts (src/core/bpf-devices.c): ``char-N`` is major N, ``char-GLOB`` every major
    whose name in that moment's /proc/devices matches the glob."""
    names: dict[str, int] = {}
    section = ""
    for line in proc_devices.splitlines():
        if line.endswith(":"):
            section = line
        elif section == "Character devices:" and line.split():
            major, name = line.split(None, 1)
            names[name] = int(major)
    majors: set[int] = set()
    for value in unit_values("DeviceAllow"):
        spec = value.split()[0]
        if not spec.startswith("char-"):
            continue
        group = spec.removeprefix("char-")
        if group.isdigit():
            majors.add(int(group))
        else:
            majors |= {major for name, major in names.items() if fnmatch.fnmatchcase(name, group)}
    return majors


BEFORE_DRIVER = "Character devices:\n  1 mem\n  4 tty\n  5 /dev/tty\n 10 misc\n136 pts\n\nBlock devices:\n  7 loop\n"
# /proc/devices on an H200 host (driver 580.159.04) once the driver is loaded.
NVIDIA_GROUPS = {
    "nvidia": 195,
    "nvidiactl": 195,
    "nvidia-uvm": 238,
    "nvidia-nvswitch": 239,
    "nvidia-nvlink": 240,
    "nvidia-caps": 241,
    "nvidia-caps-imex-channels": 242,
}
WITH_DRIVER = BEFORE_DRIVER.replace(
    " 10 misc\n", " 10 misc\n" + "".join(f"{major} {name}\n" for name, major in NVIDIA_GROUPS.items())
)


def test_device_allow_reaches_nvidiactl_when_the_driver_loads_after_the_unit() -> None:
    """Major 195 (/dev/nvidiactl, /dev/nvidiaN) is allowed even when /proc/devices had no NVIDIA entry at start."""
    assert unit_values("DevicePolicy") == ["closed"]
    assert 195 in allowed_char_majors(BEFORE_DRIVER)


def test_device_allow_covers_every_nvidia_group_loaded_before_the_unit() -> None:
    """With the driver loaded first, every NVIDIA group (uvm, caps for MIG, nvswitch...) is allowed, nothing else."""
    assert allowed_char_majors(WITH_DRIVER) == set(NVIDIA_GROUPS.values())
