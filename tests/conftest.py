"""Shared test setup: structlog reset for every test, and the fixtures many modules use.

- ``make_daemon``: :func:`tests.builders.scripted_daemon` with its state in the test's
  tmp_path (``make_daemon(script, gpu_count=2, stop_s=60, **config)``);
- ``build_daemon``: :func:`tests.builders.build_daemon`, the thin call of the Daemon
  constructor every test goes through;
- ``no_nvidia_driver``: nvmlInit fails as on a host without the NVIDIA driver (library
  not found), whether or not this host has one;
- ``process_facts``: :func:`tests.builders.process_facts`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Each test starts and ends with structlog's defaults, so a test that configures
    logging to its own (later closed) stream cannot break the tests after it."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Callable[..., Any]:
    """``make_daemon(script, *, gpu_count=1, stop_s=None, **config)`` -> (daemon, backend, clock),
    the state directory under this test's tmp_path."""

    def make(script: Callable[[float, int], float | None] = lambda t, i: 50.0, **options: Any) -> tuple[Any, Any, Any]:
        from tests.builders import scripted_daemon  # lazily: a test that needs none never imports the daemon

        return scripted_daemon(tmp_path / "state", script, **options)

    return make


@pytest.fixture
def build_daemon() -> Callable[..., Any]:
    """The thin Daemon constructor call (:func:`tests.builders.build_daemon`)."""
    from tests.builders import build_daemon

    return build_daemon


@pytest.fixture
def process_facts() -> Callable[..., Any]:
    """A builder of ProcessFacts (:func:`tests.builders.process_facts`)."""
    from tests.builders import process_facts

    return process_facts


@pytest.fixture
def no_nvidia_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynvml's nvmlInit raises NVML_ERROR_LIBRARY_NOT_FOUND in this process, as on a host without the driver."""
    pynvml = pytest.importorskip("pynvml")

    def missing() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    monkeypatch.setattr(pynvml, "nvmlInitWithFlags", lambda flags: missing(), raising=False)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes a test starts (append them): every one still running is killed and reaped after."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for child in started:
            if child.poll() is None:
                child.kill()
            child.wait()
