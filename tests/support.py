"""Helpers shared by test modules that need no governor internals (no test module imports another).

- loopback servers and tools: :func:`require_tool`, :func:`free_port`, :func:`scrape`, :func:`wait_for`;
- systemd's notify socket: :class:`NotifyListener`;
- scrapes: :func:`metric`, :func:`lateness`, :func:`p99_between`.

Helpers that build governor objects (daemons, process facts, traces) are in tests/builders.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest


def require_tool(name: str) -> str:
    """The tool's path; skipped locally when absent, a failure where CI demands system tests."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("GG_REQUIRE_SYSTEM_TESTS") == "1":
            pytest.fail(f"{name} is required (GG_REQUIRE_SYSTEM_TESTS=1) but not installed")
        pytest.skip(f"{name} not installed")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int, timeout_s: float = 20.0) -> str:
    """GET http://127.0.0.1:PORT/metrics as text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:
        body: bytes = response.read()
        return body.decode()


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` (connection errors count as not yet) until true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# ----------------------------------------------------------------------------- systemd notify


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(10)
        self.messages: list[str] = []

    def until(self, predicate: Callable[[str], bool]) -> str:
        """Receive datagrams until one satisfies ``predicate``; return it."""
        while True:
            message = self.sock.recv(4096).decode()
            self.messages.append(message)
            if predicate(message):
                return message


# ----------------------------------------------------------------------------- scrapes


def metric(body: str, name: str) -> float:
    """The value of the first sample of ``name`` in a scrape."""
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in scrape")


def lateness(body: str) -> dict[float, float]:
    """Cumulative bucket counts of the tick lateness histogram: upper bound (s) -> count."""
    out = {}
    for line in body.splitlines():
        if line.startswith("gpu_governor_tick_lateness_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            out[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    return out


def p99_between(before: dict[float, float], after: dict[float, float]) -> float:
    """Upper bound (s) of the bucket holding the 99th percentile of the ticks between two scrapes."""
    total = after[float("inf")] - before[float("inf")] if after is not before else after[float("inf")]
    for bound in sorted(after):
        count = after[bound] - (before[bound] if after is not before else 0.0)
        if count >= 0.99 * total:
            return bound
    return float("inf")


def raised_on_a_fifo(read: Callable[[Path], object], fifo: Path) -> BaseException | None:
    """What ``read(fifo)`` raised (None when it returned), ``fifo`` being made here a FIFO with no
    writer; fails the test when the read blocked (open() of a FIFO waits for a writer), after
    opening it for writing so the blocked thread ends."""
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            read(fifo)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)
        else:
            outcome.append(None)

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(timeout=10.0)
    if reader.is_alive():
        with open(fifo, "w"):  # a writer lets the blocked open() return, so the thread ends
            pass
        reader.join(timeout=10.0)
        pytest.fail(f"{getattr(read, '__name__', read)} blocked on a FIFO")
    return outcome[0]


# ----------------------------------------------------------------------------- property tests


class Branch:
    """Counts the examples of a property test in which the branch its claim is about happened.

    A property such as "a step up only happens when cool" checks nothing in an example
    without a step up; :meth:`require` fails the test when too few examples exercised it.
    Each example is also reported as a hypothesis event (shown by ``--hypothesis-show-statistics``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.examples = 0
        self.hits = 0

    def saw(self, happened: bool) -> None:
        """Record one example: did the branch happen in it?"""
        from hypothesis import event

        self.examples += 1
        self.hits += bool(happened)
        event(f"{self.what}: {'yes' if happened else 'no'}")

    def require(self, share: float) -> None:
        """Fail unless the branch happened in at least ``share`` (0-1) of the examples."""
        assert self.examples > 0, f"no examples ran for {self.what!r}"
        assert self.hits >= share * self.examples, (
            f"{self.what} happened in {self.hits} of {self.examples} examples, fewer than {share:.0%}"
        )


def openssl_self_signed(openssl: str, cert: Path, key: Path, cn: str) -> None:
    """A self-signed EC certificate ``cert`` and its ``key`` for 127.0.0.1 and localhost, made by openssl."""
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={cn}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
