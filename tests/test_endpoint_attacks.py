"""Attacks on the metrics endpoint's own HTTP handling (governor/httpwire.py, governor/httpserver.py,
governor/basicauth.py) and on its web-config file (governor/webconfig.py, governor/strictyaml.py),
each against a real server on 127.0.0.1 in this process, or a real file.

Floods come from a separate attacker process below the server's priority (as in
tests/test_endpoint_abuse.py), binding addresses of 127.0.0.0/8 (Linux routes all of it to lo).
Run this file as ``python -m tests.test_endpoint_attacks silent PORT SECONDS`` to get one.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from governor import auth, httpserver
from governor.auth import CheckBudget
from governor.basicauth import BasicAuth, Verdict
from governor.errors import ConfigError
from governor.httpserver import MetricsServer
from governor.webconfig import read_web_config
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 15.0
"""Any one exchange in these tests gives up after this long."""


def tiny_registry() -> CollectorRegistry:
    """A registry with one known series."""
    registry = CollectorRegistry()
    Gauge("attack_test_up", "Always 1.", registry=registry).set(1)
    return registry


def exchange(port: int, data: bytes, timeout_s: float = TIMEOUT_S) -> bytes:
    """Send raw bytes to 127.0.0.1:``port`` and read until the server closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def timed_scrape(port: int, timeout_s: float = TIMEOUT_S) -> tuple[bytes, float]:
    """A scrape's status line and the seconds from connect to the end of the answer."""
    started = time.monotonic()
    try:
        answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout_s)
    except OSError as exc:
        return repr(exc).encode(), time.monotonic() - started
    return answer.split(b"\r\n", 1)[0], time.monotonic() - started


# --------------------------------------------------------------------------- attackers (their own process)


def silent_flood(port: int, seconds: float) -> int:
    """Open connections that never send a byte, from ever new addresses of 127.2.0.0/16 (never
    over a per-address cap), as fast as one process can, for ``seconds``; each is dropped after
    3000 newer ones. Returns how many were opened."""
    held: collections.deque[socket.socket] = collections.deque()
    opened = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        source = f"127.2.{(opened // 200) % 250}.{opened % 200 + 1}"
        opened += 1
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            sock.connect_ex(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        held.append(sock)
        if len(held) > 3000:
            held.popleft().close()
    for sock in held:
        sock.close()
    return opened


def attacker_main(argv: list[str]) -> int:
    """``silent PORT SECONDS``: run that attack at a lower priority, print "started", then its count."""
    kind, port, seconds = argv[0], int(argv[1]), float(argv[2])
    os.nice(10)  # below the server: on a 2-core machine a peer at full priority measures CPU starvation
    print("started", flush=True)
    if kind == "silent":
        print(silent_flood(port, seconds), flush=True)
    return 0


@contextlib.contextmanager
def attacker(kind: str, port: int, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """An attacker process under way for the body of the with (it stops by itself after ``seconds``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_endpoint_attacks", kind, str(port), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        yield proc
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- floods


class TestSilentFlood:
    """Connections that never send anything, from many addresses, cannot keep a scrape waiting."""

    def test_scrapes_are_answered_during_a_silent_connection_flood(self) -> None:
        """While one process opens silent connections from ever new addresses as fast as it can, every
        scrape from 127.0.0.1 is answered 200 within a generous 30 s (a silent connection's request
        timeout is 60 s), and the server sheds silent connections instead of giving them slots."""
        # A server that gives every accepted connection a slot (the old one: scrapes took 3.3-5.9 s
        # with the default 3 s timeout) sheds nothing and fails the count below. The scrapes' latency
        # under the flood is measured by bench/flood_latency.py, not asserted here.
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), request_timeout_s=60.0)
        try:
            with attacker("silent", server.port, 20.0):
                time.sleep(1.5)  # every slot taken by a silent connection, the backlog filling
                results = []
                for _ in range(6):
                    results.append(timed_scrape(server.port, timeout_s=30.0))
                    time.sleep(0.3)
            assert all(status == b"HTTP/1.0 200 OK" for status, _ in results), results
            assert server.shed_connections > 0  # the flood was met with every slot taken
        finally:
            server.close()


class HugeSeries(Collector):
    """One series whose label value is 8 MiB: an answer far larger than the socket buffers."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the one huge series."""
        family = GaugeMetricFamily("attack_huge", "A huge label.", labels=["pad"])
        family.add_metric(["x" * (8 << 20)], 1.0)
        yield family


def non_reader(port: int) -> socket.socket:
    """A connection that sends a whole scrape request and never reads the answer (tiny receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT_S)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


class TestSlotsBusyAnswering:
    """When every slot is busy sending to clients that do not read, the server still accepts and sheds."""

    def test_accepting_goes_on_while_every_slot_is_busy_answering(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With both slots held by clients that never read a huge answer, a waiting scrape does not stop
        the accepting thread: a silent newcomer is still closed at once, and the scrape is served once a
        non-reader's answer times out."""
        monkeypatch.setattr(httpserver, "MAX_CONNECTIONS", 2)
        monkeypatch.setattr(httpserver, "RESPONSE_TIMEOUT_S", 3.0)
        registry = CollectorRegistry()
        registry.register(HugeSeries())
        server = MetricsServer("127.0.0.1", 0, registry, request_timeout_s=5.0)
        try:
            with contextlib.ExitStack() as stack:
                for _ in range(2):
                    stack.enter_context(non_reader(server.port))
                time.sleep(1.0)  # both answers rendered and stuck in full socket buffers
                scrape = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S))
                scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                time.sleep(0.2)  # the scrape is taken from the backlog and waits for a slot
                silent = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S))
                silent.settimeout(2.0)
                assert silent.recv(1) == b""  # accepted and closed: the accepting thread was not stuck
                received = 0
                while chunk := scrape.recv(1 << 20):
                    received += len(chunk)
                assert received > 8 << 20  # the whole answer, once a non-reader's slot came free
        finally:
            server.close()


class TestResetMidWrite:
    """Clients that reset the connection while their answer is being written cost nothing lasting."""

    def test_resets_mid_answer_leave_no_thread_slot_or_count_behind(self) -> None:
        """Twenty clients reset (RST) after reading a little of a huge answer: afterwards every slot is
        free, no address is counted, the server still answers, and closing it ends all its threads."""
        registry = CollectorRegistry()
        registry.register(HugeSeries())
        server = MetricsServer("127.0.0.1", 0, registry)
        inner = server._server
        try:
            for _ in range(20):
                sock = non_reader(server.port)
                assert sock.recv(4096).startswith(b"HTTP/1.0 200 OK")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # an RST while the server is still writing: EPIPE or ECONNRESET there
            assert b"HTTP/1.0 404 " in exchange(server.port, b"GET / HTTP/1.0\r\n\r\n")

            def all_free() -> bool:
                taken = [inner._slots.acquire(blocking=False) for _ in range(httpserver.MAX_CONNECTIONS)]
                for got in taken:
                    if got:
                        inner._slots.release()
                return all(taken) and inner._open == {} and inner._handed_over == set()

            # the last connection's slot comes back just after its answer is out: waited for, not raced
            wait_for(all_free, 5.0, "every slot to come back and no address to be counted")
            assert inner._workers.started <= 21
        finally:
            server.close()
        wait_for(lambda: not server._thread.is_alive() and not inner._gate._thread.is_alive(), 5.0, "threads to end")


# --------------------------------------------------------------------------- basic auth


class Recorded:
    """A password hash that matches nothing and records that it was checked."""

    def __init__(self, name: str, checked: list[str]) -> None:
        self.name = name
        self.checked = checked

    def matches(self, password: str | bytes) -> bool:
        """Record the check; never match."""
        self.checked.append(self.name)
        return False


def basic_header(user: bytes, password: bytes) -> str:
    """An Authorization value for raw user and password bytes."""
    return "Basic " + base64.b64encode(user + b":" + password).decode()


class TestUserEnumeration:
    """The time a wrong login takes does not tell whether its user name exists."""

    def test_an_unknown_users_check_runs_a_hash_picked_by_its_name(self) -> None:
        """An unknown user is checked against one of the configured hashes chosen by the name (the same
        each time), not always the first: with hashes of different costs, the first's cost marked a name
        as unknown."""
        checked: list[str] = []
        auth = BasicAuth(
            {"cheap": Recorded("cheap", checked), "costly": Recorded("costly", checked)},
            budget=CheckBudget(per_s=1e6, burst=10**6),
        )
        for n in range(40):
            assert auth.verdict(basic_header(b"nobody-%d" % n, b"guess"), f"10.0.0.{n}") is Verdict.WRONG
        assert set(checked) == {"cheap", "costly"}
        again: list[str] = []
        for attempt in range(3):
            checked.clear()
            auth.verdict(basic_header(b"nobody-7", b"guess-%d" % attempt), f"10.0.1.{attempt}")
            again += checked
        assert len(again) == 3 and len(set(again)) == 1


# --------------------------------------------------------------------------- the web-config file

HASH = "$2y$04$" + "a" * 53
"""A well-formed bcrypt hash (never checked here)."""


def refusal(tmp_path: Path, data: bytes) -> str:
    """The ConfigError text read_web_config gives for a file holding ``data`` (fails if it is accepted)."""
    path = tmp_path / "web-config.yml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        read_web_config(path)
    text = str(caught.value)
    assert str(path) in text
    return text


class TestHostileYaml:
    """A web-config file built to be ambiguous or slow to parse is refused with a clear error."""

    def test_a_merge_key_cannot_hide_a_duplicate_user(self, tmp_path: Path) -> None:
        """``<<: {alice: ...}`` beside ``alice: ...`` (a duplicate the merge would drop silently) is refused."""
        other = "$2y$04$" + "b" * 53
        text = refusal(tmp_path, f"basic_auth_users:\n  alice: '{HASH}'\n  <<: {{alice: '{other}'}}\n".encode())
        assert "merge keys (<<) are not allowed" in text

    def test_many_values_are_refused_before_they_are_all_parsed(self, tmp_path: Path) -> None:
        """A flow list of 80000 items (160 KB, under the byte cap; pure-Python PyYAML needs seconds
        for it) is refused naming the cap on values."""
        text = refusal(tmp_path, b"basic_auth_users: [" + b"1," * 80_000 + b"]\n")
        assert "at most 4096 values" in text

    def test_nesting_beyond_a_few_levels_is_refused(self, tmp_path: Path) -> None:
        """Forty levels of nested lists (far below Python's recursion limit) are refused as nested too deep."""
        text = refusal(tmp_path, b"basic_auth_users: " + b"[" * 40 + b"]" * 40 + b"\n")
        assert "nested at most 32 levels deep" in text

    def test_a_file_over_the_byte_cap_is_refused_unread(self, tmp_path: Path) -> None:
        """A 300 KiB file (a web-config is a few hundred bytes) is refused by its size, naming the cap."""
        text = refusal(tmp_path, b"# padding\n" * 30_000 + b"basic_auth_users: {}\n")
        assert "a file of at most 262144 bytes" in text

    def test_many_users_within_the_caps_are_read(self, tmp_path: Path) -> None:
        """2000 users (4001 values, about 140 KB) are still a valid file."""
        path = tmp_path / "web-config.yml"
        path.write_text("basic_auth_users:\n" + "".join(f"  u{i}: '{HASH}'\n" for i in range(2000)))
        assert len(read_web_config(path).users) == 2000


if __name__ == "__main__":
    sys.exit(attacker_main(sys.argv[1:]))


# ----------------------------------------------------------------------------- the back-off's key

NOBODY = 65534
PASSWORD = b"correct horse battery staple"
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")


def wrong_logins_as(uid: int, port: int, tries: int, first: int = 0) -> list[int]:
    """The statuses ``tries`` wrong logins get, sent from a forked child that runs as ``uid``."""
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: "
    "127.0.0.1".encode("idna")  # imported here: the child, as another user, may not read the Python install
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: another local user, sockets only
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            statuses = []
            for guess in range(first, first + tries):  # a guesser: a new password each time
                login = basic_header(b"prometheus", b"guess%d" % guess).encode()
                with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
                    sock.sendall(head + login + b"\r\n\r\n")
                    statuses.append(sock.recv(64).split()[1])
            os.write(write_end, b" ".join(statuses))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return [int(code) for code in out.split()]


class TestBackoffKey:
    def test_the_kernel_names_the_owner_of_a_loopback_client(self) -> None:
        """A loopback client's failures count against the uid owning its socket, from sock_diag or /proc/net/tcp*."""
        from governor.peeruid import client_key, owner_uid

        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as server:
                server.bind((host, 0))
                server.listen()
                with socket.create_connection(server.getsockname()[:2]) as client:
                    accepted, peer = server.accept()
                    with accepted:
                        for netlink in (True, False):  # sock_diag, and the /proc table where netlink is barred
                            assert owner_uid(peer[:2], accepted.getsockname()[:2], netlink=netlink) == os.geteuid()
                        assert client_key(accepted, peer[:2]) == f"loopback uid {os.geteuid()}"
                        assert client.fileno() >= 0

    def test_a_remote_or_unlisted_client_keeps_its_address(self, tmp_path: Path) -> None:
        """A client that is not loopback, or whose socket is not in the table, is keyed by its address."""
        from governor.peeruid import owner_uid

        assert owner_uid(("192.0.2.7", 40000), ("192.0.2.1", 9847)) is None
        (tmp_path / "tcp").write_text(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        )
        assert owner_uid(("127.0.0.1", 40000), ("127.0.0.1", 9847), proc_net=tmp_path, netlink=False) is None
        assert owner_uid(("127.0.0.1", 40000), ("127.0.0.1", 9847)) is None  # sock_diag: no such socket

    def test_a_long_table_is_scanned_in_pieces_up_to_its_bound(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The owner is found past the first piece, across a piece boundary, with its line end in the
        next piece; a socket beyond the scan bound reads as not found (keyed by address)."""
        from governor import peeruid

        header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        filler = "".join(
            f"{i:4d}: 0100007F:{i:04X} 0100007F:2673 06 00000000:00000000 03:00001000 00000000     0\n"
            for i in range(1, 400)
        )
        ours = "9999: 0100007F:9C40 0100007F:2673 01 00000000:00000000 00:00000000 00000000  1234\n"
        (tmp_path / "tcp").write_text(header + filler + ours)

        def owner() -> int | None:
            return peeruid.owner_uid(("127.0.0.1", 40000), ("127.0.0.1", 9843), proc_net=tmp_path, netlink=False)

        for chunk in (64, 97, 1000, 1 << 20):  # boundaries fall inside the needle and inside its line
            monkeypatch.setattr(peeruid, "CHUNK_BYTES", chunk)
            assert owner() == 1234, chunk
        monkeypatch.setattr(peeruid, "CHUNK_BYTES", 1000)
        monkeypatch.setattr(peeruid, "MAX_TABLE_BYTES", len(header + filler) // 2)
        assert owner() is None

    @ROOT_ONLY
    def test_another_local_user_cannot_lock_the_scraper_out(self) -> None:
        """Wrong logins from another local user (same 127.0.0.1) back off that user only: the scraper's first
        login on a fresh daemon (nothing cached) still gets its metrics."""
        hashed = auth.hash_password(PASSWORD.decode(), cost=4)  # the lowest bcrypt cost: the test stays fast
        server = MetricsServer("127.0.0.1", 0, tiny_registry(), basic_auth=BasicAuth({"prometheus": hashed}))
        try:
            statuses = wrong_logins_as(NOBODY, server.port, 12)
            assert statuses[0] == 401 and 429 in statuses  # the attacker is backed off
            login = basic_header(b"prometheus", PASSWORD)
            reply = exchange(
                server.port, f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {login}\r\n\r\n".encode()
            )
            assert reply.split()[1] == b"200", reply[:200]
            assert wrong_logins_as(NOBODY, server.port, 1, first=12) == [429]  # and stays backed off
        finally:
            server.close()
