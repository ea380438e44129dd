"""SystemdUnits against a fake systemd on a private dbus-daemon: calls, errors, a missing, dropped or hung bus.

A real ``dbus-daemon`` runs on a socket in the test's directory; a thread owns the name
``org.freedesktop.systemd1`` on it and answers the Manager and Properties calls the governor
makes, as systemd would (or not at all, when told to hang). Skipped without dbus-daemon
(unless GG_REQUIRE_SYSTEM_TESTS=1). The real systemd is exercised by tests/system/test_units_e2e.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from governor.units import SystemdUnits, UnitProperties, restart_policies

jeepney = pytest.importorskip("jeepney")
from jeepney import new_error, new_method_return  # noqa: E402
from jeepney.bus_messages import message_bus  # noqa: E402
from jeepney.io.blocking import open_dbus_connection  # noqa: E402
from jeepney.low_level import HeaderFields, MessageType  # noqa: E402

UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"


@dataclass
class FakeUnit:
    active: str = "active"
    restart: str = "no"
    n_restarts: int = 0
    pids: tuple[int, ...] = ()


@dataclass
class FakeSystemd:
    """What the fake systemd knows and was asked."""

    units: dict[str, FakeUnit] = field(default_factory=dict)
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    hang: bool = False
    received: int = 0  # method calls that reached it, answered or not


def _path(unit: str) -> str:
    return UNIT_PREFIX + "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in unit)


def _answer(state: FakeSystemd, msg: Any) -> Any:
    fields = msg.header.fields
    member, path = fields.get(HeaderFields.member), fields.get(HeaderFields.path)
    body = msg.body
    state.calls.append((member, body))
    by_path = {_path(name): name for name in state.units}
    if member in ("StopUnit", "StartUnit", "LoadUnit"):
        unit = body[0]
        if unit not in state.units:
            return new_error(msg, "org.freedesktop.systemd1.NoSuchUnit", "s", (f"Unit {unit} not found.",))
        if member == "StopUnit":
            state.units[unit].active = "inactive"
        elif member == "StartUnit":
            state.units[unit].active = "active"
        if member == "LoadUnit":
            return new_method_return(msg, "o", (_path(unit),))
        return new_method_return(msg, "o", (f"/org/freedesktop/systemd1/job/{len(state.calls)}",))
    if member == "GetUnitByPID":
        for name, unit in state.units.items():
            if body[0] in unit.pids:
                return new_method_return(msg, "o", (_path(name),))
        return new_error(
            msg, "org.freedesktop.systemd1.NoUnitForPID", "s", (f"PID {body[0]} does not belong to any unit.",)
        )
    if member == "Get" and path in by_path:
        name = by_path[path]
        unit = state.units[name]
        values = {
            "Id": ("s", name),
            "LoadState": ("s", "loaded"),
            "ActiveState": ("s", unit.active),
            "Restart": ("s", unit.restart),
            "NRestarts": ("u", unit.n_restarts),
        }
        return new_method_return(msg, "v", (values[body[1]],))
    if member == "ListUnitsByPatterns":
        rows = [
            (name, "", "loaded", u.active, "running", "", _path(name), 0, "", "/") for name, u in state.units.items()
        ]
        return new_method_return(msg, "a(ssssssouso)", (rows,))
    return new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (str(member),))


def _serve(address: str, state: FakeSystemd, ready: threading.Event, stop: threading.Event) -> None:
    conn = open_dbus_connection(bus=address)
    conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.systemd1"))
    ready.set()
    try:
        while not stop.is_set():
            try:
                msg = conn.receive(timeout=0.1)
            except TimeoutError:
                continue
            except (OSError, EOFError, ConnectionError):
                return
            if msg.header.message_type is not MessageType.method_call:
                continue
            state.received += 1
            if state.hang:
                continue
            conn.send(_answer(state, msg))
    finally:
        conn.close()


class Bus:
    """A private dbus-daemon with the fake systemd on it; ``restart()`` drops and brings both back."""

    def __init__(self, directory: Path, state: FakeSystemd) -> None:
        self.socket = directory / "bus"
        self.address = f"unix:path={self.socket}"
        self.state = state
        self.daemon: subprocess.Popen[bytes] | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        binary = shutil.which("dbus-daemon")
        assert binary is not None
        self.daemon = subprocess.Popen(
            [binary, "--session", "--nofork", "--nopidfile", f"--address={self.address}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert time.monotonic() < deadline, "dbus-daemon did not create its socket"
            time.sleep(0.02)
        self.stop = threading.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=_serve, args=(self.address, self.state, ready, self.stop), daemon=True)
        self.thread.start()
        assert ready.wait(10), "the fake systemd did not get its name"

    def kill(self) -> None:
        self.stop.set()
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.wait(timeout=10)
            self.daemon = None
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.socket.unlink(missing_ok=True)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    """A running private bus with a fake systemd holding three units."""
    if shutil.which("dbus-daemon") is None:
        if os.environ.get("GG_REQUIRE_SYSTEM_TESTS") == "1":
            pytest.fail("GG_REQUIRE_SYSTEM_TESTS=1 but dbus-daemon is missing")
        pytest.skip("dbus-daemon is not installed")
    state = FakeSystemd(
        units={
            "secondary-sd.service": FakeUnit(pids=(4242,)),
            "primary-llm.service": FakeUnit(restart="always", n_restarts=2, pids=(4141,)),
            "game.scope": FakeUnit(),
        }
    )
    running = Bus(tmp_path, state)
    running.start()
    try:
        yield running
    finally:
        running.kill()


def wait_for_properties(units: SystemdUnits, unit: str) -> UnitProperties:
    deadline = time.monotonic() + 10
    while (props := units.properties(unit)) is None:
        assert time.monotonic() < deadline, "properties never arrived"
        time.sleep(0.02)
    return props


class TestCalls:
    def test_stop_start_and_owner(self, bus: Bus) -> None:
        """StopUnit/StartUnit go out with mode replace and change the unit; GetUnitByPID names the owner."""
        units = SystemdUnits(bus.address)
        try:
            assert units.error is None and units.connects == 0  # lazy: nothing opened yet
            owner = units.unit_of_pid(4242)
            assert (owner.ok, owner.value) == (True, "secondary-sd.service")
            stop = units.stop_unit("secondary-sd.service")
            assert stop.ok and stop.value is not None and "/job/" in stop.value
            assert bus.state.units["secondary-sd.service"].active == "inactive"
            assert units.start_unit("secondary-sd.service").ok
            assert bus.state.units["secondary-sd.service"].active == "active"
            assert ("StopUnit", ("secondary-sd.service", "replace")) in bus.state.calls
            assert ("StartUnit", ("secondary-sd.service", "replace")) in bus.state.calls
            assert units.connects == 1 and units.error is None
        finally:
            units.close()

    def test_properties_never_block_and_arrive(self, bus: Bus) -> None:
        """properties() answers None at once, then the unit's Restart=, NRestarts and states."""
        units = SystemdUnits(bus.address)
        try:
            props = wait_for_properties(units, "primary-llm.service")
            assert props == UnitProperties("primary-llm.service", "loaded", "active", "always", 2)
        finally:
            units.close()

    def test_systemd_errors_are_answers_not_a_broken_bus(self, bus: Bus) -> None:
        """NoSuchUnit and NoUnitForPID come back as failed calls naming the error; the bus stays usable."""
        units = SystemdUnits(bus.address)
        try:
            call = units.stop_unit("nothing.service")
            assert not call.ok and call.error is not None and "NoSuchUnit" in call.error
            owner = units.unit_of_pid(99)
            assert not owner.ok and owner.error is not None and "NoUnitForPID" in owner.error
            assert units.error is None and units.start_unit("game.scope").ok and units.connects == 1
        finally:
            units.close()

    def test_restart_policies_for_check_config(self, bus: Bus) -> None:
        """The check-config lookup lists the units matching a glob with their Restart=."""
        found = restart_policies(["*-llm.service"], address=bus.address)
        assert found == {"*-llm.service": [UnitProperties("primary-llm.service", "loaded", "active", "always", 2)]}
        assert restart_policies(["x.service"], address=f"unix:path={bus.socket}.absent") is None


class TestFailures:
    def test_absent_bus_fails_fast_and_is_reported(self, tmp_path: Path) -> None:
        """No bus: the call fails with the reason within the timeout, error is set, no retry before retry_s."""
        units = SystemdUnits(f"unix:path={tmp_path / 'no-bus'}", timeout_s=1.0, retry_s=60.0)
        try:
            began = time.monotonic()
            call = units.stop_unit("secondary-sd.service")
            assert time.monotonic() - began < 10.0
            assert not call.ok and not call.timed_out and call.error is not None and "cannot connect" in call.error
            assert units.error is not None and "cannot connect" in units.error
            again = units.start_unit("secondary-sd.service")
            assert not again.ok and units.connects == 0
        finally:
            units.close()

    def test_reconnects_after_the_bus_drops(self, bus: Bus) -> None:
        """dbus restarted: the call on the dead connection fails, a later one reconnects and works."""
        units = SystemdUnits(bus.address, timeout_s=1.0, retry_s=0.0)
        try:
            assert units.start_unit("game.scope").ok
            bus.kill()
            failed = units.stop_unit("game.scope")
            assert not failed.ok and units.error is not None
            bus.start()
            deadline = time.monotonic() + 10
            while not (call := units.stop_unit("game.scope")).ok:
                assert time.monotonic() < deadline, call.error
                time.sleep(0.1)
            assert units.connects == 2 and units.error is None
        finally:
            units.close()

    def test_a_hung_systemd_stalls_a_call_for_the_timeout_only(self, bus: Bus) -> None:
        """systemd never answers: the call comes back timed out (the actuator counts it queued) in bounded time."""
        bus.state.hang = True
        units = SystemdUnits(bus.address, timeout_s=0.5, retry_s=0.0)
        try:
            began = time.monotonic()
            call = units.stop_unit("secondary-sd.service")
            assert time.monotonic() - began < 5.0
            assert not call.ok and call.timed_out
        finally:
            units.close()

    def test_a_hung_systemd_costs_one_timeout_then_calls_fail_at_once(self, bus: Bus) -> None:
        """After a timeout nothing is sent for retry_s (a tick waits once, not once per call); then it is retried."""
        bus.state.hang = True
        now = [0.0]
        units = SystemdUnits(bus.address, timeout_s=0.5, retry_s=30.0, clock=lambda: now[0])
        try:
            assert units.stop_unit("secondary-sd.service").timed_out
            sent = bus.state.received
            later = [units.unit_of_pid(4242), units.stop_unit("game.scope"), units.start_unit("game.scope")]
            assert [(c.ok, c.timed_out) for c in later] == [(False, False)] * 3
            assert bus.state.received == sent and units.error is not None
            bus.state.hang = False
            now[0] = 31.0
            assert units.start_unit("game.scope").ok and units.error is None
        finally:
            units.close()


def test_the_properties_cache_stays_bounded(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """Properties of more units than the cache holds evict the oldest; the newest stay answered."""
    import governor.units

    monkeypatch.setattr(governor.units, "MAX_CACHED_UNITS", 4)
    for i in range(10):
        bus.state.units[f"many-{i}.service"] = FakeUnit()
    units = SystemdUnits(bus.address)
    try:
        for i in range(10):
            wait_for_properties(units, f"many-{i}.service")
        assert len(units._cache) <= 4 and units.properties("many-9.service") is not None
    finally:
        units.close()
