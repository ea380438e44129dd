"""An unprivileged local user against the VRAM enforcement: ways to look protected, or to be taken for another.

Real processes throughout. Each test is an attack that worked on an earlier version:

- a process whose main thread exits while its other threads run on (and keep their GPU memory) shows
  no exe and an empty command line, like a kernel thread; orphaned to PID 1 it was taken for one,
  and kernel threads are never signalled;
- a process started in the same clock tick (10 ms) as the GPU listing, right after it, was taken for
  the process the listing named under that PID: charged with its memory and signalled in its place;
- a user namespace lets any user mount what they like where they like, for themselves: a root-owned
  system binary bind-mounted at ``/usr/local/bin/Xorg`` shows that path as its exe from outside, and
  got the built-in protection of display servers; the same mount of one's own binary at the path a
  generous class names (``exe = "/usr/local/bin/ollama"``) put the process in that class.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from governor.classes import ProcessAction, ProcessClass, ProcessMatch, VramPolicy
from governor.processes import ProcessInspector, read_start_time
from tests.builders import GiB, Harness
from tests.support import wait_for

SYS_EXIT = {"x86_64": 60, "aarch64": 93}.get(platform.machine())
"""The raw exit system call (ends the calling thread only, unlike exit_group)."""
THREAD_LEADER_EXITS = (
    "import ctypes, os, sys, threading, time\n"
    "threading.Thread(target=time.sleep, args=(120,)).start()\n"
    "print(os.getpid(), flush=True)\n"
    "ctypes.CDLL(None).syscall(int(sys.argv[1]), 0)\n"  # the main thread ends, the process goes on
)
ORPHAN = (
    "import subprocess, sys\n"
    "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], start_new_session=True)\n"
)
"""Starts the attacker and exits at once, so the attacker is reparented (to PID 1 without a subreaper)."""
SLEEP = shutil.which("sleep", path="/usr/bin:/bin")


def _state_and_ppid(pid: int) -> tuple[str, int]:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


@pytest.fixture
def leaderless() -> Iterator[int]:
    """A process whose main thread has exited while another thread runs on, orphaned; its pid."""
    if SYS_EXIT is None:
        pytest.skip(f"the exit system call's number on {platform.machine()} is not known here")
    launcher = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, THREAD_LEADER_EXITS, str(SYS_EXIT)], stdout=subprocess.PIPE
    )
    assert launcher.stdout is not None
    pid = int(launcher.stdout.readline())
    launcher.wait()
    try:
        wait_for(lambda: _state_and_ppid(pid)[0] == "Z", 5.0, "the main thread to exit")
        if _state_and_ppid(pid)[1] > 2:
            pytest.skip("a subreaper adopts orphans here: the process cannot look like a kernel thread's child")
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class TestNotAKernelThread:
    def test_a_process_whose_main_thread_exited_is_not_a_kernel_thread(self, leaderless: int) -> None:
        """No exe, no command line and PID 1 as parent do not make a user process a kernel thread."""
        assert _no_exe(leaderless) and Path(f"/proc/{leaderless}/cmdline").read_bytes() == b""
        got = ProcessInspector().facts(leaderless, None, VramPolicy())
        assert got.start_time is not None and not got.kernel_thread
        assert got.protected is None

    def test_a_real_kernel_thread_still_is_one(self) -> None:
        """kthreadd (PID 2 on the host) is known as a kernel thread by the kernel's own flag."""
        stat = Path("/proc/2/stat")
        if not stat.exists() or b"(kthreadd)" not in stat.read_bytes():
            pytest.skip("no kthreadd visible (a PID namespace)")
        got = ProcessInspector().facts(2, None, VramPolicy())
        assert got.kernel_thread and got.protected == "a kernel thread"

    def test_it_is_signalled_when_over_budget(self, tmp_path: Path, leaderless: int) -> None:
        """Over its budget past the grace, the process whose main thread exited is SIGTERMed like any other."""
        toml = {
            "vram": {"reserve": "2GiB", "cooldown_s": 5.0},
            "class": [
                {
                    "name": "mine",
                    "budget": "3GiB",
                    "action": "terminate",
                    "grace_s": 2.0,
                    "match": {"user": os.getuid()},
                }
            ],
        }
        h = Harness(tmp_path, toml)
        start = read_start_time(leaderless)
        h.daemon.start()
        h.backend.attach_process(0, leaderless, 4 * GiB)
        with capture_logs() as logs:
            h.step(4)
        over = [e for e in logs if e["event"] == "process_over_budget"]
        assert over and "protected" not in str(over[0])
        wait_for(lambda: read_start_time(leaderless) != start, 10.0, "the process to end")
        assert any(e["event"] == "process_signalled" and e["signal"] == "SIGTERM" for e in logs)


def _no_exe(pid: int) -> bool:
    try:
        os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return True
    return False


class TestListingClockTick:
    def test_a_process_started_right_after_the_listing_is_never_the_listed_one(self) -> None:
        """Forked right after the listing, in the same clock tick or not, a process is always marked newer."""
        policy = VramPolicy(
            classes=(ProcessClass("any", ProcessMatch(user=str(os.getuid())), GiB, action=ProcessAction.KILL),)
        )
        inspector = ProcessInspector()
        for _ in range(20):
            inspector.mark_listing()
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            try:
                got = inspector.facts(child.pid, None, policy)
                assert got.newer_than_listing, f"started at {got.start_time}, listed at the same tick or before"
            finally:
                child.kill()
                child.wait()


class TestSpoofedExecutable:
    @pytest.mark.skipif(SLEEP is None or shutil.which("unshare") is None, reason="needs sleep and unshare")
    def test_a_system_binary_mounted_under_a_protected_name_is_not_protected(self, tmp_path: Path) -> None:
        """A root-owned binary bind-mounted in a private mount namespace as /usr/local/bin/Xorg gets no protection.

        Run as root here; any user gets the same with ``unshare -Urm`` (a user namespace of their own)."""
        if os.geteuid() != 0 or not Path("/usr/local").is_dir():
            pytest.skip("mounting in a private mount namespace needs root (or user namespaces) and /usr/local")
        assert SLEEP is not None
        shell = (
            "mount -t tmpfs tmpfs /usr/local && mkdir /usr/local/bin && : > /usr/local/bin/Xorg && "
            f'mount --bind "{os.path.realpath(SLEEP)}" /usr/local/bin/Xorg && exec /usr/local/bin/Xorg 60'
        )
        child = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell])
        try:
            wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe") == "/usr/local/bin/Xorg", 5.0, "the fake Xorg")
            assert not os.path.exists("/usr/local/bin/Xorg") or not os.path.samefile(
                "/usr/local/bin/Xorg", f"/proc/{child.pid}/exe"
            )
            got = ProcessInspector().facts(child.pid, None, VramPolicy(protected_names=("Xorg",)))
            assert got.exe == "/usr/local/bin/Xorg" and got.exe_name == "Xorg"
            assert not got.system_exe and got.protected is None
        finally:
            child.kill()
            child.wait()

    @pytest.mark.skipif(SLEEP is None or shutil.which("unshare") is None, reason="needs sleep and unshare")
    def test_own_binary_mounted_at_a_class_exe_path_does_not_join_the_class(self, tmp_path: Path) -> None:
        """A copy of a binary bind-mounted privately at the exe path of a generous class stays out of that class;
        a process really running the file at a class's exe path is still matched.

        Run as root here; any user gets the same with ``unshare -Urm``."""
        if os.geteuid() != 0 or not Path("/usr/local").is_dir():
            pytest.skip("mounting in a private mount namespace needs root (or user namespaces) and /usr/local")
        assert SLEEP is not None
        own = tmp_path / "mine"
        shutil.copyfile(os.path.realpath(SLEEP), own)
        own.chmod(0o755)
        generous = ProcessClass("primary", ProcessMatch(exe="/usr/local/bin/ollama"), 64 * GiB)
        real = ProcessClass("sleepers", ProcessMatch(exe=os.path.realpath(SLEEP)), GiB)
        policy = VramPolicy(classes=(generous, real))
        shell = (
            "mount -t tmpfs tmpfs /usr/local && mkdir /usr/local/bin && : > /usr/local/bin/ollama && "
            f'mount --bind "{own}" /usr/local/bin/ollama && exec /usr/local/bin/ollama 60'
        )
        child = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell])
        honest = subprocess.Popen([os.path.realpath(SLEEP), "60"])
        try:
            wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe") == "/usr/local/bin/ollama", 5.0, "the fake ollama")
            got = ProcessInspector().facts(child.pid, None, policy)
            assert got.exe == "/usr/local/bin/ollama" and got.exe_elsewhere
            assert got.klass == "unclassified", got.why
            wait_for(lambda: os.readlink(f"/proc/{honest.pid}/exe") == os.path.realpath(SLEEP), 5.0, "the exec")
            assert ProcessInspector().facts(honest.pid, None, policy).klass == "sleepers"
        finally:
            for process in (child, honest):
                process.kill()
                process.wait()

    def test_exe_paths_are_looked_up_as_the_host_sees_them(self, tmp_path: Path) -> None:
        """With init's root readable, an exe path is checked there, not in the governor's own mount namespace
        (which ProtectHome= empties): the same file there matches, another file at that path does not."""
        binary = tmp_path / "bin" / "llama-server"
        binary.parent.mkdir()
        binary.write_bytes(b"\x7fELF")
        proc = tmp_path / "proc"
        host = proc / "1" / "root"
        (host / binary.parent.relative_to("/")).mkdir(parents=True)
        for pid, start in ((100, 1000), (200, 2000)):
            base = proc / str(pid)
            base.mkdir()
            (base / "stat").write_text(f"{pid} (llama-server) S 1 {' '.join(['0'] * 17)} {start} 0\n")
            (base / "comm").write_text("llama-server\n")
            (base / "exe").symlink_to(binary)
        policy = VramPolicy(classes=(ProcessClass("primary", ProcessMatch(exe="*/llama-server"), 8 * GiB),))
        inspector = ProcessInspector(proc=proc)
        assert inspector.host_root == str(host)
        os.link(binary, host / binary.relative_to("/"))  # the host shows the very same file there
        assert inspector.facts(100, None, policy).klass == "primary"
        (host / binary.relative_to("/")).unlink()
        shutil.copyfile(binary, host / binary.relative_to("/"))  # the host shows another file at that path
        got = inspector.facts(200, None, policy)
        assert got.exe_elsewhere and got.klass == "unclassified"
        assert ProcessInspector(proc=tmp_path / "nothing").host_root == ""  # no init root to look through


class TestClosedClientIsNobodysRoot:
    def test_a_client_that_closed_its_socket_is_not_taken_for_root(self) -> None:
        """Once the client closed its end (a kernel time-wait socket, which names no owner) the lookup
        names no uid, not uid 0: a wrong password sent before a close must not back off root's scraper."""
        from governor.peeruid import client_key, owner_uid

        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as server:
                server.bind((host, 0))
                server.listen()
                client = socket.create_connection(server.getsockname()[:2])
                accepted, peer = server.accept()
                with accepted:
                    client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                    client.close()
                    assert accepted.recv(64).startswith(b"GET")
                    # the kernel acks the client's FIN (at once, or after its delayed-ack timer): time-wait
                    wait_for(functools.partial(_time_wait, peer[1]), 5.0, "the client socket in time-wait")
                    for netlink in (True, False):
                        assert owner_uid(peer[:2], accepted.getsockname()[:2], netlink=netlink) is None
                    assert client_key(accepted, peer[:2]) == peer[0]


def _time_wait(port: int) -> bool:
    """Whether the loopback TCP socket with local ``port`` is a kernel time-wait socket (timer 3 in /proc/net/tcp*)."""
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                return fields[5].startswith("03:")
    return False
