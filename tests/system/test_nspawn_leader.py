"""The system tests' choice of the container's PID 1 (tests/system/nspawn.py), without a container.

systemd-nspawn's short-lived "outer child" lives in our PID namespace; the container's init is
PID 1 of a namespace below it. Picking the outer child made stop 21's CI time out at boot.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.system.nspawn import is_namespace_init


def test_a_process_in_our_namespace_is_not_a_container_init() -> None:
    """A process of our own PID namespace (as the outer child is) is refused as the leader."""
    assert not is_namespace_init(os.getpid())
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not is_namespace_init(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_gone_process_is_not_a_container_init() -> None:
    """A PID that exited (the outer child, a moment later) is refused, not an error."""
    child = subprocess.Popen(["true"])
    child.wait()
    assert not is_namespace_init(child.pid)


def test_pid_1_of_a_new_pid_namespace_is_a_container_init() -> None:
    """The init of a nested PID namespace is taken (needs root for unshare; skipped elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("unshare --pid needs root")
    child = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        inits: list[int] = []
        while not inits and time.monotonic() < deadline:
            children = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()
            inits = [int(pid) for pid in children if is_namespace_init(int(pid))]
            time.sleep(0.01)
        assert inits, "the sleep run by unshare --fork is PID 1 of its namespace"
    finally:
        child.kill()
        child.wait()
