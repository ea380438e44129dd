"""systemd units through D-Bus: stop, start, who owns a PID, and a unit's properties.

The core speaks to a :class:`UnitManager`; two implement it:

* :class:`SystemdUnits`, the real one, on the system bus (``org.freedesktop.systemd1``)
  through ``jeepney`` (pure Python; Debian 12's python3-jeepney). It connects lazily, on
  the first call. Every call runs on one worker thread and the caller waits at most
  ``timeout_s``: a bus that hangs never stalls a tick for longer. A connection that
  drops (dbus restarted, EOF, a timeout) is closed and opened again on the next call,
  not sooner than ``retry_s`` after a failed connect or a call that timed out (calls in
  between fail at once, unsent). A missing bus is no error of the
  loop: the call fails with the reason, and :attr:`SystemdUnits.error` says it until a
  call succeeds again (the daemon logs the change once). Properties are read without
  blocking at all: :meth:`SystemdUnits.properties` answers from a cache and refreshes it
  in the background.
* :class:`MemoryUnits`, in memory: for tests, the simulator and the what-if tools, which
  must never touch the machine's units.

StopUnit and StartUnit use the mode ``replace``; systemd queues a job and answers at once,
so a call returns well before the unit has stopped. As root (with CAP_SYS_ADMIN) systemd
grants them without polkit.

:func:`restart_policies` is the blocking lookup ``check-config`` uses: the units that
match a glob and their ``Restart=`` setting, or None when systemd does not answer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
CALL_TIMEOUT_S = 2.0
"""The longest a tick waits for systemd's answer to one call (s)."""
RETRY_S = 5.0
"""After a failed connect, the next one is tried no sooner than this (s)."""
LOOKUP_TIMEOUT_S = 10.0
"""check-config's whole Restart= lookup gives up after this many seconds."""
PROPERTIES_TTL_S = 30.0
"""Cached unit properties are refreshed after this many seconds."""
MAX_CACHED_UNITS = 1024
"""Units whose properties are cached; the unit first cached is dropped first."""
RESTARTS_AFTER_KILL = {
    # Restart= value -> the signals after which systemd starts the service again.
    # SIGTERM (like SIGHUP, SIGINT, SIGPIPE) is a clean exit for systemd; SIGKILL is not.
    "always": ("SIGTERM", "SIGKILL"),
    "on-success": ("SIGTERM",),
    "on-failure": ("SIGKILL",),
    "on-abnormal": ("SIGKILL",),
    "on-abort": ("SIGKILL",),
}


@dataclass(frozen=True, slots=True)
class UnitCall:
    """The answer to one call: ``ok`` with a ``value`` (a job path, a unit name), or why not.
    ``timed_out``: no answer within the timeout (the call may still take effect)."""

    ok: bool
    value: str | None = None
    error: str | None = None
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class UnitProperties:
    """What systemd says about one unit; a value it did not give is None."""

    name: str
    load_state: str | None = None
    active_state: str | None = None
    restart: str | None = None  # Restart= of a service ("no", "always", "on-failure", ...)
    n_restarts: int | None = None  # NRestarts of a service


def undone_by_restart(restart: str | None, signals: Iterable[str]) -> bool:
    """True when a service with ``Restart=restart`` is started again after any of ``signals``."""
    again = RESTARTS_AFTER_KILL.get(restart or "no", ())
    return any(s in again for s in signals)


class UnitManager(Protocol):
    """What the governor asks of systemd."""

    def stop_unit(self, unit: str) -> UnitCall:
        """Queue a stop job for ``unit`` (mode replace)."""
        ...

    def start_unit(self, unit: str) -> UnitCall:
        """Queue a start job for ``unit`` (mode replace)."""
        ...

    def unit_of_pid(self, pid: int) -> UnitCall:
        """The unit the process ``pid`` belongs to now (``value``), as systemd says."""
        ...

    def properties(self, unit: str) -> UnitProperties | None:
        """The unit's properties from a cache, without blocking; None until known."""
        ...

    @property
    def error(self) -> str | None:
        """Why systemd cannot be reached now (None: it answered last time, or was never asked)."""
        ...


# --------------------------------------------------------------------------- in memory


@dataclass
class MemoryUnit:
    """A unit of :class:`MemoryUnits`."""

    active: bool = True
    restart: str = "no"
    n_restarts: int = 0
    pids: set[int] = field(default_factory=set)


class MemoryUnits:
    """Units in memory: stop and start flip ``active`` and are recorded in ``calls``.

    ``unavailable`` (a reason) makes every call fail as a missing bus does; ``on_change``
    is called with (unit, active) after a stop or a start (a simulator detaches or attaches
    the unit's processes there).
    """

    def __init__(self, units: dict[str, MemoryUnit] | None = None) -> None:
        self.units: dict[str, MemoryUnit] = dict(units or {})
        self.calls: list[tuple[str, str]] = []
        self.unavailable: str | None = None
        self.on_change: Callable[[str, bool], None] | None = None

    @property
    def error(self) -> str | None:
        """The injected reason the "bus" is unavailable, or None."""
        return self.unavailable

    def _change(self, verb: str, unit: str, active: bool) -> UnitCall:
        self.calls.append((verb, unit))
        if self.unavailable is not None:
            return UnitCall(False, error=self.unavailable)
        known = self.units.get(unit)
        if known is None:
            return UnitCall(False, error=f"org.freedesktop.systemd1.NoSuchUnit: Unit {unit} not found.")
        known.active = active
        if not active:
            known.pids.clear()
        if self.on_change is not None:
            self.on_change(unit, active)
        return UnitCall(True, value=f"/org/freedesktop/systemd1/job/{len(self.calls)}")

    def stop_unit(self, unit: str) -> UnitCall:
        """Mark ``unit`` inactive (its processes gone)."""
        return self._change("stop", unit, False)

    def start_unit(self, unit: str) -> UnitCall:
        """Mark ``unit`` active."""
        return self._change("start", unit, True)

    def unit_of_pid(self, pid: int) -> UnitCall:
        """The unit whose ``pids`` hold ``pid``."""
        if self.unavailable is not None:
            return UnitCall(False, error=self.unavailable)
        for name, unit in self.units.items():
            if pid in unit.pids:
                return UnitCall(True, value=name)
        return UnitCall(False, error=f"org.freedesktop.systemd1.NoUnitForPID: PID {pid} does not belong to any unit.")

    def properties(self, unit: str) -> UnitProperties | None:
        """The unit's state, or None for an unknown unit (or no "bus")."""
        known = self.units.get(unit)
        if known is None or self.unavailable is not None:
            return None
        return UnitProperties(unit, "loaded", "active" if known.active else "inactive", known.restart, known.n_restarts)


# --------------------------------------------------------------------------- systemd on the system bus


class _Unreachable(Exception):
    """The bus cannot be reached (no connection could be made)."""


def _connect_system_bus(address: str | None) -> Any:
    from jeepney.io.blocking import open_dbus_connection

    return open_dbus_connection(bus=address or "SYSTEM", auth_timeout=CALL_TIMEOUT_S)


class _Bus:
    """Method calls on one jeepney connection (used only on the worker thread)."""

    def __init__(self, conn: Any, timeout_s: float) -> None:
        self.conn = conn
        self.timeout_s = timeout_s

    def call(self, path: str, interface: str, member: str, signature: str, body: tuple[Any, ...]) -> tuple[Any, ...]:
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import unwrap_msg

        address = DBusAddress(path, bus_name=BUS_NAME, interface=interface)
        reply = self.conn.send_and_get_reply(new_method_call(address, member, signature, body), timeout=self.timeout_s)
        return tuple(unwrap_msg(reply))

    def manager(self, member: str, signature: str, *args: Any) -> tuple[Any, ...]:
        return self.call(MANAGER_PATH, MANAGER, member, signature, args)

    def get(self, path: str, interface: str, name: str) -> Any:
        body = self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss", (interface, name))
        _signature, value = body[0]
        return value

    def properties(self, unit: str) -> UnitProperties:
        path = str(self.manager("LoadUnit", "s", unit)[0])
        props = UnitProperties(unit, str(self.get(path, UNIT, "LoadState")), str(self.get(path, UNIT, "ActiveState")))
        if unit.endswith(".service") and props.load_state == "loaded":
            props = replace(
                props,
                restart=str(self.get(path, SERVICE, "Restart")),
                n_restarts=int(self.get(path, SERVICE, "NRestarts")),
            )
        return props

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def _dbus_error(exc: Exception) -> str | None:
    """The text of a D-Bus error reply (the bus works; systemd said no), else None."""
    name = getattr(exc, "name", None)
    if name is None or not type(exc).__name__.startswith("DBusError"):
        return None
    data = getattr(exc, "data", ())
    text = str(data[0]) if isinstance(data, tuple) and data else ""
    return f"{name}: {text}".strip().rstrip(":")


class SystemdUnits:
    """The system manager on the system bus; see the module docstring.

    ``address`` is a D-Bus address (``unix:path=...``; None: the system bus);
    ``connect`` opens a connection from it (tests pass their own).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout_s: float = CALL_TIMEOUT_S,
        retry_s: float = RETRY_S,
        connect: Callable[[str | None], Any] = _connect_system_bus,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._connect = connect
        self._clock = clock
        self._jobs: queue.SimpleQueue[tuple[Callable[[_Bus], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._bus: _Bus | None = None
        self._next_connect_s = 0.0
        self._error: str | None = None
        self._cache: dict[str, tuple[float, UnitProperties]] = {}
        self._pending: set[str] = set()
        self._running_since: float | None = None
        self.connects = 0  # connections opened, for tests and curiosity

    @property
    def error(self) -> str | None:
        """Why systemd cannot be reached now, or None."""
        return self._error

    # ------------------------------------------------------------------ the worker

    def _submit(self, job: Callable[[_Bus], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="systemd-dbus", daemon=True)
                self._thread.start()
            self._jobs.put((job, future))
        return future

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                break
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            self._running_since = self._clock()
            try:
                result = job(self._connection())
            except Exception as exc:
                if _dbus_error(exc) is None:
                    self._drop(exc)
                else:
                    self._error = None  # systemd answered, with an error of its own
                future.set_exception(exc)
            else:
                self._error = None
                future.set_result(result)
            finally:
                self._running_since = None
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    def _connection(self) -> _Bus:
        if self._bus is not None:
            return self._bus
        now = self._clock()
        if now < self._next_connect_s:
            raise _Unreachable(self._error or "the system bus is not reachable")
        try:
            conn = self._connect(self.address)
        except Exception as exc:
            self._next_connect_s = now + self.retry_s
            raise _Unreachable(f"cannot connect to the system bus: {type(exc).__name__}: {exc}") from None
        self.connects += 1
        self._bus = _Bus(conn, self.timeout_s)
        return self._bus

    def _drop(self, exc: Exception) -> None:
        """A transport failure: forget the connection (the next call reconnects). After a call
        that got no answer in time, as after a failed connect, nothing is sent for ``retry_s``:
        a hung systemd costs a tick one timeout, not one per call."""
        self._error = str(exc) if isinstance(exc, _Unreachable) else f"system bus: {type(exc).__name__}: {exc}"
        if isinstance(exc, TimeoutError):
            self._next_connect_s = self._clock() + self.retry_s
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    def _call(self, job: Callable[[_Bus], Any], what: str) -> UnitCall:
        running = self._running_since
        if running is not None and self._clock() - running > self.timeout_s:
            # The worker is stuck on an earlier call (a bus that accepts and never answers):
            # fail at once rather than stall every tick; nothing was sent.
            return UnitCall(
                False,
                error=f"{what}: not sent, systemd has not answered an earlier call for {self._clock() - running:.0f} s",
            )
        future = self._submit(job)
        try:
            value = future.result(timeout=self.timeout_s + 0.5)
        except FutureTimeout:
            return UnitCall(False, error=f"{what}: no answer from systemd within {self.timeout_s:g} s", timed_out=True)
        except Exception as exc:
            text = _dbus_error(exc) or (str(exc) if isinstance(exc, _Unreachable) else f"{type(exc).__name__}: {exc}")
            return UnitCall(False, error=f"{what}: {text}", timed_out=isinstance(exc, TimeoutError))
        return UnitCall(True, value=None if value is None else str(value))

    def close(self) -> None:
        """End the worker (and the connection) once the queued calls are done."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._jobs.put(None)
                self._thread.join(timeout=self.timeout_s + 1.0)
            self._thread = None

    # ------------------------------------------------------------------ the calls

    def stop_unit(self, unit: str) -> UnitCall:
        """StopUnit(unit, "replace"); ``value`` is the job's object path."""
        return self._call(lambda bus: bus.manager("StopUnit", "ss", unit, "replace")[0], f"StopUnit {unit}")

    def start_unit(self, unit: str) -> UnitCall:
        """StartUnit(unit, "replace"); ``value`` is the job's object path."""
        return self._call(lambda bus: bus.manager("StartUnit", "ss", unit, "replace")[0], f"StartUnit {unit}")

    def unit_of_pid(self, pid: int) -> UnitCall:
        """GetUnitByPID(pid), then the unit's Id."""

        def job(bus: _Bus) -> str:
            path = str(bus.manager("GetUnitByPID", "u", pid)[0])
            return str(bus.get(path, UNIT, "Id"))

        return self._call(job, f"GetUnitByPID {pid}")

    def properties(self, unit: str) -> UnitProperties | None:
        """The cached properties of ``unit`` (None until the first answer); refreshed in the
        background when older than PROPERTIES_TTL_S. Never blocks."""
        now = self._clock()
        cached = self._cache.get(unit)
        if (cached is None or now - cached[0] > PROPERTIES_TTL_S) and unit not in self._pending:
            self._pending.add(unit)

            def job(bus: _Bus) -> None:
                self._cache[unit] = (self._clock(), bus.properties(unit))
                while len(self._cache) > MAX_CACHED_UNITS:
                    del self._cache[next(iter(self._cache))]

            self._submit(job).add_done_callback(lambda _f: self._pending.discard(unit))
        return None if cached is None else cached[1]


# --------------------------------------------------------------------------- check-config


def restart_policies(
    patterns: Iterable[str], address: str | None = None, timeout_s: float = CALL_TIMEOUT_S
) -> dict[str, list[UnitProperties]] | None:
    """For each unit glob, the loaded units that match it with their properties (Restart=);
    None when systemd does not answer on the bus (each call bounded by ``timeout_s``, the
    whole lookup, connection included, by ``LOOKUP_TIMEOUT_S``)."""
    found: list[dict[str, list[UnitProperties]] | None] = [None]
    wanted = list(patterns)

    def lookup() -> None:
        try:
            conn = _connect_system_bus(address)
        except Exception:
            return
        bus = _Bus(conn, timeout_s)
        out: dict[str, list[UnitProperties]] = {}
        try:
            for pattern in wanted:
                listed = bus.manager("ListUnitsByPatterns", "asas", [], [pattern])[0]
                names = sorted({str(e[0]) for e in listed if fnmatch.fnmatchcase(str(e[0]), pattern)})
                out[pattern] = [bus.properties(name) for name in names]
        except Exception:
            return
        finally:
            bus.close()
        found[0] = out

    worker = threading.Thread(target=lookup, name="systemd-lookup", daemon=True)
    worker.start()
    worker.join(LOOKUP_TIMEOUT_S)  # a bus that accepts and never answers cannot hang check-config
    return found[0]
