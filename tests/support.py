"""Small helpers shared by tests that run real processes and servers on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable

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
