"""The daemon: owns the loop, the schedule and the signals, and wires the others together.

One thread does all the work. Signals only wake the loop (a self-pipe written by the
C-level handler); the loop waits on that pipe with a timeout until the next tick is
due, so a signal cuts the sleep short and every state change happens on the loop's thread. Ticks run on a
drift-free schedule (start + k * interval); a tick that runs late does not shift
the ones after it, and ticks missed entirely are skipped, not run in a burst.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import select
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

from governor import __version__
from governor.actuator import Actuator
from governor.backends import Backend, BackendFatal
from governor.clock import Clock, VirtualClock
from governor.config import Config, ConfigError, ConfigIssue, check_resolved, deep_cap_problem, load_config
from governor.logsetup import escape, get_logger
from governor.model import (
    TICK_BUCKETS_S,
    Action,
    ActionResult,
    ClassUsage,
    Decision,
    DecisionRecord,
    GpuHealth,
    GpuReading,
    GpuStatus,
    Outcome,
    ProcessRow,
    PublishedState,
    Snapshot,
    ThermalZone,
)
from governor.notify import Notifier
from governor.processes import ProcessFacts, ProcessInspector
from governor.rules.engine import GpuPlan, GpuRuleState, evaluate
from governor.rules.power import target_w
from governor.rules.vram import under_pressure
from governor.safefile import check_private_dir, write_atomic
from governor.state import OriginalLimits

RELOAD = "reload"
STOP = "stop"

RELOAD_SETTLE_S = 0.5
"""A reloaded config must have stayed unchanged this long (seconds) before it is read."""
RELOAD_SETTLE_MAX_S = 5.0
"""The longest a reload waits for a file that keeps changing (seconds)."""


def memory_only_originals(config: Config) -> bool:
    """True for a simulated run whose hardware lives in memory (no ``[simulation] state_file``).

    Its GPUs start from their defaults in every run, so their originals need not
    survive one, and a simulation never writes into a real governor's state_dir.
    """
    return config.backend == "simulated" and not config.simulation.state_file


def check_state_dirs(config: Config, euid: int | None = None) -> None:
    """When running as root, refuse a state_dir or runtime_dir that others own or may write.

    The governor writes files there as root and trusts what it reads back; a directory
    a user can write lets that user plant links or forge the saved originals.
    Raises ConfigError (exit 3 at start) with one line per directory naming the fix.
    """
    dirs = [("runtime_dir", config.runtime_dir)]
    if not memory_only_originals(config):
        dirs.insert(0, ("state_dir", config.state_dir))
    issues = []
    for key, directory in dirs:
        if not directory:
            continue
        problem = check_private_dir(Path(directory), euid)
        if problem is not None:
            issues.append(
                ConfigIssue(
                    config.source,
                    key,
                    "a directory owned by root and writable only by root, since the governor writes its "
                    f"state there as root (fix: chown root:root {directory} && chmod 755 {directory})",
                    problem,
                )
            )
    if issues:
        raise ConfigError(issues)


class Waiter(Protocol):
    """How the loop waits for its next tick or an event."""

    def put(self, event: str) -> None:
        """Queue an event (safe from a signal handler)."""
        ...

    def wait(self, deadline_s: float) -> list[str]:
        """Block until ``deadline_s`` on the clock or until an event arrives; return the events."""
        ...


class PipeWaiter:
    """Real waiting on a self-pipe: signals and requests from other threads wake the loop.

    ``signal.set_wakeup_fd`` makes the C-level signal handler write the signal number
    into the pipe the moment a signal arrives, so ``select`` returns at once; the
    Python-level handlers do nothing at all. Events are read back from the bytes in the
    pipe, so nothing depends on when Python runs its handlers. Other threads ask for a
    reload or a stop by writing the same bytes.
    """

    CODES: ClassVar[dict[int, str]] = {signal.SIGHUP: RELOAD, signal.SIGTERM: STOP, signal.SIGINT: STOP}
    BYTES: ClassVar[dict[str, bytes]] = {RELOAD: bytes([signal.SIGHUP]), STOP: bytes([signal.SIGTERM])}

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._installed = False
        self._closed = False
        self._lock = threading.Lock()  # put() from other threads never races close()

    def install_signal_handlers(self) -> None:
        """Route SIGHUP, SIGTERM and SIGINT into the pipe (main thread only)."""
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._installed = True
        for signum in self.CODES:
            signal.signal(signum, _ignore_signal)

    def put(self, event: str) -> None:
        """Queue an event (from any thread); a no-op once the loop has ended and closed the pipe."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # a full pipe already holds a wake-up
                os.write(self._write_fd, self.BYTES[event])

    def wait(self, deadline_s: float) -> list[str]:
        """Wait for the deadline or the first event, then return every event queued."""
        timeout = max(0.0, deadline_s - self._clock.monotonic())
        readable, _, _ = select.select([self._read_fd], [], [], timeout)
        events: list[str] = []
        if readable:
            while True:
                try:
                    data = os.read(self._read_fd, 512)
                except BlockingIOError:
                    break
                if not data:
                    break
                events.extend(self.CODES[b] for b in data if b in self.CODES)
        return events

    def close(self) -> None:
        """Close the pipe (after the loop ended); signals stop writing to it first."""
        if self._installed:
            with contextlib.suppress(ValueError):  # only the main thread may do this
                signal.set_wakeup_fd(-1)
            self._installed = False
        with self._lock:
            self._closed = True
            for fd in (self._read_fd, self._write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _ignore_signal(signum: int, frame: object) -> None:
    """The Python-level handler: nothing to do, the wake-up fd carried the signal."""


class VirtualWaiter:
    """Virtual waiting: jump the virtual clock to the deadline unless an event is queued."""

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._events: list[str] = []

    def put(self, event: str) -> None:
        """Queue an event."""
        self._events.append(event)

    def wait(self, deadline_s: float) -> list[str]:
        """Return queued events at once, else advance the clock to the deadline."""
        if self._events:
            events, self._events = self._events, []
            return events
        self._clock.advance_to(deadline_s)
        return []


EVENT_NAMES = {
    "thermal_zone": "thermal_zone_changed",
    "power_step_down": "power_limit_stepped",
    "power_step_up": "power_limit_stepped",
    "power_critical": "power_limit_stepped",
    "power_hold": "power_limit_held",
    "power_drift_reapply": "power_limit_drift_reapplied",
    "power_drift_external_lower": "power_limit_external_lower",
    "restore_on_stop": "power_limit_restored",
    "restore_after_crash": "power_limit_restored",
}
"""Log event names of GPU-level decisions (process decisions are logged by _log_process_decision)."""
PROCESS_ACTION_NAMES = {
    Action.NONE: "over_budget",
    Action.SIGNAL_TERM: "sigterm",
    Action.SIGNAL_KILL: "sigkill",
}


class Daemon:
    """The governor: read, decide, act, publish, once per interval."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        clock: Clock,
        *,
        config_path: Path | None = None,
        waiter: Waiter | None = None,
        notifier: Notifier | None = None,
        metrics_server_factory: Callable[[Callable[[], PublishedState | None]], Any] | None = None,
        load: Callable[[Path], Config] = load_config,
        inspector: ProcessInspector | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.backend = backend
        self.clock = clock
        self.waiter: Waiter = waiter if waiter is not None else PipeWaiter(clock)
        self.notifier = notifier if notifier is not None else Notifier()
        self._metrics_server_factory = metrics_server_factory
        self._load = load
        self.metrics_server: Any = None
        self.log = get_logger()
        self.published: PublishedState | None = None
        self._gpus = backend.gpus()
        check_state_dirs(config)
        self.originals = OriginalLimits(None if memory_only_originals(config) else config.state_dir)
        self.actuator = Actuator(backend, self.originals, self._gpus, dry_run=config.dry_run)
        self.plans = self._build_plans(config)
        self.states: dict[str, GpuRuleState] = {}
        self.inspector = inspector if inspector is not None else ProcessInspector()
        self.facts: dict[int, ProcessFacts] = {}
        self._process_actions: Counter[tuple[str, str, str]] = Counter()
        self.snapshot: Snapshot | None = None
        self._started_wall_s = clock.wall()
        self._config_loaded_wall_s = clock.wall()
        self._config_ok = True
        self._reloads: Counter[str] = Counter()
        self._decision_counts: Counter[tuple[int, str, str]] = Counter()
        self._action_counts: Counter[tuple[int, str, str]] = Counter()
        self._read_errors: Counter[int] = Counter()
        self._last_decision: dict[str, tuple[Decision, float]] = {}
        self._last_power: dict[str, DecisionRecord] = {}  # by GPU UUID
        self._last_vram: dict[str, DecisionRecord] = {}  # by GPU UUID
        self.instance_id = uuid.uuid4().hex  # names this run in the metrics and in processes.json
        self._process_table_written_s: float | None = None  # wall time of the last write
        self._tick_count = 0
        self._tick_buckets = [0] * len(TICK_BUCKETS_S)
        self._late_buckets = [0] * len(TICK_BUCKETS_S)
        self._late_sum_s = 0.0
        self._late_count = 0
        self._tick_failures = 0
        self._tick_sum_s = 0.0
        self._tick_last_s: float | None = None
        self._ready = False
        self._process_table_key: list[tuple[Any, ...]] | None = None  # None: never written yet
        self._process_table_disabled = False
        self._frozen_cache: dict[int, tuple[tuple[int, int], tuple[tuple[Any, int], ...]]] = {}
        self._monitor_only_logged: set[str] = set()
        self._state_error_logged: str | None = None
        self._health: dict[str, GpuHealth] = {}  # by UUID, as of the last tick
        self._pressure: dict[str, bool] = {}  # by UUID: memory pressure as of the last tick
        self._hands_off_logged: set[str] = set()
        self.reload_settle_s = RELOAD_SETTLE_S
        self.reload_settle_max_s = RELOAD_SETTLE_MAX_S

    # ------------------------------------------------------------------ wiring

    def _build_plans(self, config: Config) -> dict[str, GpuPlan]:
        """Each GPU's plan. A GPU the ladder would deep-cap by surprise (one that appeared after
        start, where nothing can be refused any more) gets no ladder: never a silent cut."""
        plans = {}
        for gpu in self._gpus:
            policy = config.policy_for(gpu)
            if deep_cap_problem(policy.power, gpu) is not None:
                policy = replace(policy, power=replace(policy.power, enabled=False))
            plans[gpu.uuid] = GpuPlan.build(gpu, policy)
        return plans

    def install_signal_handlers(self) -> None:
        """SIGHUP reloads, SIGTERM and SIGINT stop: the signals only wake the loop's waiter."""
        install = getattr(self.waiter, "install_signal_handlers", None)
        if install is not None:
            install()
        else:
            signal.signal(signal.SIGHUP, lambda *_: self.waiter.put(RELOAD))
            signal.signal(signal.SIGTERM, lambda *_: self.waiter.put(STOP))
            signal.signal(signal.SIGINT, lambda *_: self.waiter.put(STOP))

    def request_stop(self) -> None:
        """Ask the loop to stop (thread-safe)."""
        self.waiter.put(STOP)

    def request_reload(self) -> None:
        """Ask the loop to reload its config (thread-safe)."""
        self.waiter.put(RELOAD)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Restore leftovers of a crash, take the first snapshot, bind metrics, send READY."""
        combined = check_resolved(self.config, self._gpus)
        if combined:
            raise ConfigError(combined)
        self.log.info(
            "governor_starting",
            version=__version__,
            backend=self.backend.name,
            gpus=len(self._gpus),
            config=self.config.source,
            dry_run=self.config.dry_run,
        )
        for gpu in self._gpus:
            plan = self.plans[gpu.uuid]
            self.log.info(
                "gpu_found",
                gpu=gpu.index,
                uuid=gpu.uuid,
                name=gpu.name,
                power_limit_range_w=f"{gpu.power_limit_min_w}-{gpu.power_limit_max_w}",
                ladder_w=list(plan.ladder_w),
            )
        if self.originals.load_warning:
            self.log.warning(
                "state_unreadable",
                detail=self.originals.load_warning,
                moved_to=None if self.originals.set_aside_to is None else str(self.originals.set_aside_to),
                effect="a GPU without a usable saved original whose limit is below its default "
                "gets its default limit back; delete the .corrupt file once inspected",
            )
        backend_warning = getattr(self.backend, "state_warning", None)
        if backend_warning:
            self.log.warning("backend_state_unreadable", detail=str(backend_warning))
        if self.waiting_reason:
            self.log.warning("waiting_for_driver", reason=self.waiting_reason, effect="retrying; metrics are served")
        snapshot = self.backend.read()
        leftovers = self.actuator.restore(snapshot, snapshot.t_s, "restore_after_crash")
        self._log_results(leftovers)
        if any(r.outcome is Outcome.APPLIED for r in leftovers):
            snapshot = self.backend.read()
        self._tick(snapshot)
        if self._metrics_server_factory is not None:
            self.metrics_server = self._metrics_server_factory(lambda: self.published)
            server = self.metrics_server
            summary = getattr(server, "security_summary", None)
            self.log.info(
                "metrics_listening", url=getattr(server, "url", None), security=summary() if summary else None
            )
            warnings = getattr(server, "security_warnings", None)
            if warnings is not None and warnings():
                self.log.warning(
                    "metrics_exposed",
                    url=server.url,
                    tls=getattr(server, "tls", None) is not None,
                    basic_auth=bool(getattr(server, "basic_auth", None)),
                    warnings=list(warnings()),
                )
        self._ready = True
        self._publish(snapshot, 0.0)
        self.notifier.ready(self.status_line())
        self.log.info("governor_ready", status=self.status_line())

    def run(self) -> int:
        """Start, loop until asked to stop, clean up; returns the process exit code."""
        try:
            self.start()
        except BackendFatal as exc:
            self.log.critical("backend_fatal", error=str(exc))
            self._close()
            return 5
        except BaseException:
            self._close()
            raise
        interval = self.config.poll_interval_s
        origin = self.clock.monotonic()
        k = 1
        code = 0
        try:
            while True:
                deadline = origin + k * interval
                events = self.waiter.wait(deadline)
                if STOP in events:
                    break
                if RELOAD in events:
                    self.reload()  # a storm of SIGHUPs arrives here drained: one reload
                    if self.config.poll_interval_s != interval:
                        interval, origin, k = self.config.poll_interval_s, self.clock.monotonic(), 1
                    continue
                now = self.clock.monotonic()
                if now < deadline:
                    continue
                self._record_lateness(now - deadline)
                try:
                    self.tick()
                except BackendFatal as exc:
                    self.log.critical("backend_fatal", error=str(exc))
                    code = 5
                    break
                except Exception as exc:  # a bug or an unforeseen hardware error must not stop governing
                    self._tick_failures += 1
                    self.log.exception("tick_failed", error=str(exc), failures=self._tick_failures)
                missed = int((self.clock.monotonic() - origin) // interval)
                k = max(k + 1, missed + 1)
        finally:
            self.stop()
        return code

    def _record_lateness(self, late_s: float) -> None:
        """How late a tick started against its schedule (seconds), for the lateness histogram."""
        late_s = max(0.0, late_s)
        self._late_count += 1
        self._late_sum_s += late_s
        for i in range(bisect.bisect_left(TICK_BUCKETS_S, late_s), len(TICK_BUCKETS_S)):
            self._late_buckets[i] += 1

    def tick(self) -> None:
        """One cycle: read every GPU, run the rules, act, publish, ping the watchdog."""
        started = time.perf_counter()
        self.inspector.mark_listing()  # a process started after this holds a reused PID: not charged
        snapshot = self.backend.read()
        self._tick(snapshot)
        self._publish(snapshot, time.perf_counter() - started)
        self.notifier.watchdog()
        if self.notifier.enabled:
            self.notifier.status(self.status_line())

    def _follow_gpus(self, snapshot: Snapshot) -> None:
        """Pick up GPUs that appeared (a driver that loaded late) or went away."""
        gpus = self.backend.gpus()
        if gpus == self._gpus:
            return
        old = {g.uuid for g in self._gpus}
        new = {g.uuid for g in gpus}
        for gpu in gpus:
            if gpu.uuid not in old:
                self.log.info("gpu_found", gpu=gpu.index, uuid=gpu.uuid, name=gpu.name)
        for gone in old - new:
            self.log.warning("gpu_gone", uuid=gone)
        self._gpus = gpus
        for issue in check_resolved(self.config, gpus):
            self.log.error("config_contradiction", detail=str(issue), effect="a refused ladder is not applied")
        self.plans = self._build_plans(self.config)
        self.actuator.set_gpus(gpus)
        appeared = new - old
        if appeared and self._ready:
            self._log_results(self.actuator.restore(snapshot, snapshot.t_s, "restore_after_crash", only=appeared))

    def _tick(self, snapshot: Snapshot) -> None:
        self._follow_gpus(snapshot)
        self.snapshot = snapshot
        for reading in snapshot.gpus:
            if reading.health is not GpuHealth.OK:
                self._read_errors[reading.index] += 1
        self.facts = self._inspect(snapshot)
        vram = self.config.vram if self.config.vram.enabled else None
        previous = self.states
        self.states, decisions = evaluate(
            snapshot, self.plans, self.states, dry_run=self.config.dry_run, vram=vram, facts=self.facts
        )
        results = self.actuator.apply(decisions, snapshot)
        self._log_transitions(snapshot)
        self._undo_unsaved_changes(previous, results)
        self._log_results(results)
        self._check_state_store()
        self._write_process_table(snapshot)

    def _undo_unsaved_changes(self, previous: dict[str, GpuRuleState], results: list[ActionResult]) -> None:
        """A limit change refused because the GPU's original is not saved did not happen: the ladder
        goes back to where it was, so the rules decide the change again next tick (the retry)."""
        for result in results:
            uuid = result.decision.gpu_uuid
            if result.outcome is Outcome.REFUSED and uuid in self.actuator.hands_off and uuid in self.states:
                before = previous.get(uuid, GpuRuleState())
                self.states[uuid] = replace(self.states[uuid], ladder=before.ladder)

    def _inspect(self, snapshot: Snapshot) -> dict[int, ProcessFacts]:
        """Facts for every process any GPU reports; one unreadable process never stops the tick."""
        facts: dict[int, ProcessFacts] = {}
        for reading in snapshot.gpus:
            for process in reading.processes or ():
                if process.pid in facts:
                    continue
                try:
                    facts[process.pid] = self.inspector.facts(process.pid, process.name, self.config.vram)
                except Exception as exc:  # a hostile /proc entry must not stop the loop
                    self.log.warning("process_inspect_failed", pid=process.pid, error=str(exc))
        self.inspector.forget_except(facts)
        return facts

    def _settle(self, path: Path) -> bool:
        """Wait until ``path`` has stayed unchanged (inode, size, mtime) for ``reload_settle_s``.

        A reload that reads a file while its writer is still writing it would apply a torn
        file; a file last changed longer ago than the settle time is read at once. Waits at
        most ``reload_settle_max_s``, then reads what is there (validation judges it). The
        wait is on the waiter, so SIGTERM cuts it short: False means a stop was queued.
        """
        settle_s = self.reload_settle_s
        if settle_s <= 0:
            return True

        def identity() -> tuple[int, int, int] | None:
            try:
                info = os.stat(path)
            except OSError:
                return None  # the read reports it
            return (info.st_ino, info.st_size, info.st_mtime_ns)

        seen = identity()
        if seen is None or time.time() - seen[2] / 1e9 >= settle_s:
            return True
        begin = quiet_since = self.clock.monotonic()
        while True:
            now = self.clock.monotonic()
            if now - quiet_since >= settle_s:
                return True
            if now - begin >= self.reload_settle_max_s:
                self.log.warning("config_still_changing", config=str(path), waited_s=round(now - begin, 3))
                return True
            events = self.waiter.wait(now + min(0.1, settle_s))
            if STOP in events:
                self.waiter.put(STOP)
                return False
            current = identity()
            if current != seen:
                seen, quiet_since = current, self.clock.monotonic()

    def reload(self) -> bool:
        """Validate the config file first; swap it in only if whole and valid."""
        self.notifier.reloading()
        try:
            if self.config_path is None:
                raise ConfigError([])
            if not self._settle(self.config_path):
                return False  # asked to stop while waiting: the stop comes next
            new = self._load(self.config_path)
            combined = check_resolved(new, self._gpus)
            if combined:
                raise ConfigError(combined)
        except Exception as exc:  # no file, however broken, may stop the governor
            error = (
                exc
                if isinstance(exc, ConfigError)
                else ConfigError(
                    [
                        ConfigIssue(
                            str(self.config_path),
                            "",
                            "a config the governor can read",
                            f"{type(exc).__name__}: {exc}"[:160],
                        )
                    ]
                )
            )
            self._config_ok = False
            self._reloads["failure"] += 1
            self.log.error(
                "config_reload_failed",
                config=str(self.config_path),
                errors=error.summary() or ["no config file to reload"],
                kept=self.config.source,
            )
            self.notifier.ready(self.status_line())
            return False
        for key in ("backend", "state_dir", "metrics", "simulation"):
            if getattr(new, key) != getattr(self.config, key):
                self.log.warning("config_change_needs_restart", key=key)
                new = replace(new, **{key: getattr(self.config, key)})
        self.config = new
        self.plans = self._build_plans(new)
        self.inspector.clear()
        self.actuator.dry_run = new.dry_run
        self._config_ok = True
        self._config_loaded_wall_s = self.clock.wall()
        self._reloads["success"] += 1
        self.log.info(
            "config_reloaded",
            config=new.source,
            step_down_at_c=new.power.step_down_at_c,
            step_up_at_c=new.power.step_up_at_c,
        )
        self.notifier.ready(self.status_line())
        return True

    def stop(self) -> None:
        """STOPPING=1, restore every original limit, release the hardware and the port."""
        self.notifier.stopping()
        self.log.info("governor_stopping")
        snapshot = None
        with contextlib.suppress(Exception):
            snapshot = self.backend.read()
        t_s = snapshot.t_s if snapshot is not None else self.clock.monotonic()
        self._log_results(self.actuator.restore(snapshot, t_s, "restore_on_stop"))
        self._check_state_store()
        self._close()
        self.log.info("governor_stopped")

    def _close(self) -> None:
        close_waiter = getattr(self.waiter, "close", None)
        if close_waiter is not None:
            close_waiter()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        self.backend.close()

    # ------------------------------------------------------------------ reporting

    def _log_results(self, results: list[ActionResult]) -> None:
        wall = self.clock.wall()
        for result in results:
            decision = result.decision
            self._decision_counts[(decision.gpu_index, decision.rule, decision.action.value)] += 1
            if decision.pid is not None and decision.process_class is not None:
                action_name = PROCESS_ACTION_NAMES.get(decision.action, decision.action.value)
                outcome = result.outcome.value if decision.action is not Action.NONE else "reported"
                self._process_actions[(decision.process_class, action_name, outcome)] += 1
            if decision.action is not Action.NONE:
                self._action_counts[(decision.gpu_index, decision.action.value, result.outcome.value)] += 1
            self._last_decision[decision.gpu_uuid] = (decision, wall)
            outcome = result.outcome.value if decision.action is not Action.NONE else "reported"
            record = DecisionRecord(decision, wall, outcome)
            if decision.pid is not None:
                self._last_vram[decision.gpu_uuid] = record
            elif decision.action is Action.SET_POWER_LIMIT or decision.rule.startswith("power"):
                self._last_power[decision.gpu_uuid] = record
            self._log_decision(result)

    def _log_transitions(self, snapshot: Snapshot) -> None:
        """One event when a GPU is lost (error) or back (warning), and when memory pressure begins or ends (warning)."""
        for r in snapshot.gpus:
            health, was = r.health, self._health.get(r.uuid, GpuHealth.OK)
            self._health[r.uuid] = health
            if health is GpuHealth.LOST and was is not GpuHealth.LOST:
                self.log.error("gpu_lost", gpu=r.index, uuid=r.uuid, reason="the GPU stopped answering")
            elif health is not GpuHealth.LOST and was is GpuHealth.LOST:
                self.log.warning("gpu_recovered", gpu=r.index, uuid=r.uuid, health=health.value)
            if health is GpuHealth.LOST or r.memory_used_bytes is None or not self.config.vram.enabled:
                continue  # no reading: pressure is neither begun nor ended
            pressure = under_pressure(r, self.config.vram)
            if pressure != self._pressure.get(r.uuid, False):
                self._pressure[r.uuid] = pressure
                fields = {"gpu": r.index, "uuid": r.uuid, "used_bytes": r.memory_used_bytes}
                fields["total_bytes"] = r.memory_total_bytes
                self.log.warning("memory_pressure_began" if pressure else "memory_pressure_ended", **fields)

    def _log_decision(self, result: ActionResult) -> None:
        d = result.decision
        if d.pid is not None:
            self._log_process_decision(result)
            return
        fields: dict[str, Any] = {
            "gpu": d.gpu_index,
            "uuid": d.gpu_uuid,
            "rule": d.rule,
            "reason": d.reason,
        }
        if result.outcome is not Outcome.SKIPPED:
            fields["outcome"] = result.outcome.value
        if d.reading is not None:
            fields["temperature_c"] = d.reading
        if d.threshold is not None:
            fields["threshold_c"] = d.threshold
        if d.rule == "thermal_zone":
            fields["from_zone"], fields["to_zone"] = d.from_value, d.to_value
        else:
            fields["from_w"], fields["to_w"] = d.from_value, d.to_value
        if result.detail:
            fields["detail"] = result.detail
        event = EVENT_NAMES.get(d.rule, d.rule)
        if result.outcome is Outcome.DRY_RUN:
            self.log.info("power_limit_would_set", **fields)
        elif result.outcome is Outcome.FAILED:
            self.log.error("power_limit_set_failed", **fields)
            if d.gpu_uuid in self.actuator.monitor_only and d.gpu_uuid not in self._monitor_only_logged:
                self._monitor_only_logged.add(d.gpu_uuid)
                self.log.error("gpu_monitor_only", gpu=d.gpu_index, uuid=d.gpu_uuid, reason=result.detail)
        elif result.outcome is Outcome.REFUSED:
            self.log.debug(event, **fields)
        elif (
            (d.rule == "thermal_zone" and ThermalZone(str(d.to_value)).severity >= ThermalZone.THROTTLE.severity)
            or d.rule in ("power_critical", "power_hold", "power_drift_external_lower")
            or (d.rule == "thermal_zone" and d.to_value == ThermalZone.UNKNOWN.value)
        ):
            self.log.warning(event, **fields)
        else:
            self.log.info(event, **fields)

    def _log_process_decision(self, result: ActionResult) -> None:
        d = result.decision
        facts = self.facts.get(d.pid) if d.pid is not None else None
        fields: dict[str, Any] = {
            "gpu": d.gpu_index,
            "uuid": d.gpu_uuid,
            "rule": d.rule,
            "pid": d.pid,
            "process": d.from_value,
            "class": d.process_class,
            "used_bytes": None if d.reading is None else int(d.reading),
            "budget_bytes": None if d.threshold is None else int(d.threshold),
            "reason": d.reason,
        }
        if facts is not None:
            fields["matched"] = facts.why
            if facts.unit:
                fields["unit"] = facts.unit
            if facts.protected:
                fields["protected"] = facts.protected
        if d.action is Action.NONE:
            self.log.warning("process_over_budget", **fields)
            return
        fields["signal"] = PROCESS_ACTION_NAMES[d.action].upper()
        fields["outcome"] = result.outcome.value
        if result.detail:
            fields["detail"] = result.detail
        if result.outcome is Outcome.DRY_RUN:
            self.log.warning("process_would_signal", **fields)
        elif result.outcome is Outcome.FAILED:
            self.log.error("process_signal_failed", **fields)
        elif result.outcome is Outcome.APPLIED:
            self.log.warning("process_signalled", **fields)
        else:
            self.log.info("process_left_alone", **fields)

    def _gpu_processes(self, reading: GpuReading | None) -> tuple[tuple[ClassUsage, ...], int, tuple[ProcessRow, ...]]:
        """Per-class VRAM use, unclassified count and process rows for one GPU."""
        if reading is None or not reading.processes:
            return (), 0, ()
        vram = self.config.vram
        usage: dict[str, list[int]] = {}
        rows = []
        unclassified = 0
        for process in reading.processes:
            facts = self.facts.get(process.pid)
            klass = facts.klass if facts is not None else vram.default_class.name
            budget = vram.class_named(klass).budget_bytes
            used = process.used_memory_bytes
            entry = usage.setdefault(klass, [0, 0, 0])
            entry[0] += used or 0
            entry[1] += 1
            entry[2] += 1 if budget is not None and used is not None and used > budget else 0
            if klass == vram.default_class.name:
                unclassified += 1
            if vram.per_process_metrics:
                rows.append(
                    ProcessRow(
                        pid=process.pid,
                        name=(facts.name if facts else process.name) or "",
                        klass=klass,
                        unit=(facts.unit if facts else None) or "",
                        used_bytes=used,
                        why=facts.why if facts else "",
                    )
                )
        classes = tuple(ClassUsage(name, u, n, o) for name, (u, n, o) in sorted(usage.items()))
        return classes, unclassified, tuple(rows)

    def _write_process_table(self, snapshot: Snapshot) -> None:
        """Write every GPU process with its class and why to runtime_dir/processes.json (0600).

        Rewritten only when the table changed; a directory that cannot be written (not
        root, no RuntimeDirectory) disables it with one debug event.
        """
        if not self.config.runtime_dir or self._process_table_disabled:
            return
        entries = [
            (reading.index, process, self.facts.get(process.pid))
            for reading in snapshot.gpus
            for process in reading.processes or ()
        ]
        default = self.config.vram.default_class.name
        key = [(gpu, p.pid, f.klass if f else default, (p.used_memory_bytes or 0) >> 20) for gpu, p, f in entries]
        now_s = self.clock.wall()
        written = self._process_table_written_s
        fresh = written is not None and 0.0 <= now_s - written < self.config.poll_interval_s
        if key == self._process_table_key and fresh:
            return  # unchanged; still rewritten once per poll interval so readers can tell it is live
        self._process_table_key = key
        rows = [
            {
                "gpu": gpu,
                "pid": process.pid,
                "name": escape((facts.name if facts else process.name) or "?"),
                "class": facts.klass if facts else default,
                "why": escape(facts.why) if facts else "",
                "unit": escape(facts.unit or "") if facts else "",
                "user": facts.user if facts else None,
                "used_bytes": process.used_memory_bytes,
                "budget_bytes": self.config.vram.class_named(facts.klass if facts else default).budget_bytes,
                "protected": facts.protected if facts else None,
            }
            for gpu, process, facts in entries
        ]
        path = Path(self.config.runtime_dir) / "processes.json"
        body = json.dumps(
            {
                "daemon": {"pid": os.getpid(), "instance": self.instance_id},
                "written_at_s": now_s,
                "wall_time_s": snapshot.wall_time_s,
                "processes": rows,
            }
        )
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            # An exclusive temporary file (mkstemp, 0600), renamed: a planted symlink is never followed.
            write_atomic(path, body.encode("utf-8"), durable=False)  # /run is tmpfs: nothing to fsync
            self._process_table_written_s = now_s
        except OSError as exc:
            self._process_table_disabled = True
            self.log.debug("process_table_disabled", path=str(path), error=exc.strerror or str(exc))

    def _check_state_store(self) -> None:
        error = self.originals.last_error
        if error and error != self._state_error_logged:
            self.log.error(
                "state_write_failed",
                detail=error,
                effect="a GPU whose original limit is not saved is left unchanged until it is; retried each tick",
            )
        self._state_error_logged = error
        for warning in self.originals.drain_warnings():
            self.log.warning("state_entry_rejected", detail=warning)
        hands_off = set(self.actuator.hands_off)
        indexes = {g.uuid: g.index for g in self._gpus}
        for gpu_uuid in sorted(hands_off - self._hands_off_logged):
            self.log.error(
                "original_limit_unsaved",
                gpu=indexes.get(gpu_uuid),
                uuid=gpu_uuid,
                reason=self.actuator.hands_off[gpu_uuid],
                effect="power limit left unchanged until the original is saved",
            )
        for gpu_uuid in sorted(self._hands_off_logged - hands_off):
            self.log.info("original_limit_saved", gpu=indexes.get(gpu_uuid), uuid=gpu_uuid)
        self._hands_off_logged = hands_off

    def _original_limit_saved(self, uuid: str) -> bool | None:
        """False while a GPU is left alone because its original could not be saved, True once saved, else None."""
        if uuid in self.actuator.hands_off:
            return False
        return True if self.originals.get(uuid) is not None and self.originals.is_durable(uuid) else None

    @property
    def waiting_reason(self) -> str | None:
        """Why the backend has no GPUs yet (the driver is not loaded), or None."""
        reason = getattr(self.backend, "waiting_reason", None)
        return str(reason) if reason else None

    def status_line(self) -> str:
        """A one-line summary for systemd's STATUS= and humans."""
        if self.waiting_reason:
            return f"waiting for the NVIDIA driver ({self.waiting_reason}); retrying"
        if self.snapshot is None:
            return "starting"
        parts = []
        for reading in self.snapshot.gpus:
            state = self.states.get(reading.uuid, GpuRuleState())
            if reading.health is GpuHealth.LOST:
                parts.append(f"gpu{reading.index} lost")
                continue
            temp = "?" if reading.temperature_c is None else f"{reading.temperature_c:.0f}C"
            limit = "?" if reading.power_limit_w is None else f"{reading.power_limit_w:.0f}W"
            parts.append(f"gpu{reading.index} {temp} {state.zone.value} {limit}")
        prefix = "dry-run; " if self.config.dry_run else ""
        return f"{prefix}governing {len(self.snapshot.gpus)} GPU(s): " + ", ".join(parts)

    def _frozen(self, counter: Counter[Any]) -> tuple[tuple[Any, int], ...]:
        """An immutable, sorted copy of a counter, rebuilt only when the counter changed."""
        key = id(counter)
        total = counter.total()
        cached = self._frozen_cache.get(key)
        if cached is None or cached[0] != (len(counter), total):
            cached = ((len(counter), total), tuple(sorted(counter.items())))
            self._frozen_cache[key] = cached
        return cached[1]

    def _publish(self, snapshot: Snapshot, duration_s: float) -> None:
        if duration_s > 0:
            self._tick_count += 1
            self._tick_sum_s += duration_s
            self._tick_last_s = duration_s
            for i in range(bisect.bisect_left(TICK_BUCKETS_S, duration_s), len(TICK_BUCKETS_S)):
                self._tick_buckets[i] += 1
        statuses = []
        readings = {r.uuid: r for r in snapshot.gpus}
        for gpu in self._gpus:
            plan = self.plans[gpu.uuid]
            state = self.states.get(gpu.uuid, GpuRuleState())
            last = self._last_decision.get(gpu.uuid)
            reading = readings.get(gpu.uuid)
            classes, unclassified, rows = self._gpu_processes(reading)
            statuses.append(
                GpuStatus(
                    info=gpu,
                    zone=state.zone,
                    zone_thresholds_c=plan.zone_thresholds_c,
                    ladder_w=plan.ladder_w,
                    rung=state.ladder.rung,
                    target_w=target_w(state.ladder, plan.ladder_w),
                    monitor_only=self.actuator.monitor_only.get(gpu.uuid),
                    last_decision=None if last is None else last[0],
                    last_decision_wall_s=None if last is None else last[1],
                    classes=classes,
                    unclassified_processes=unclassified,
                    memory_pressure=None if reading is None else under_pressure(reading, self.config.vram),
                    processes=rows,
                    original_limit_saved=self._original_limit_saved(gpu.uuid),
                    last_power=self._last_power.get(gpu.uuid),
                    last_vram=self._last_vram.get(gpu.uuid),
                )
            )
        self.published = PublishedState(
            version=__version__,
            backend=self.backend.name,
            started_wall_s=self._started_wall_s,
            config_source=self.config.source,
            config_loaded_wall_s=self._config_loaded_wall_s,
            config_reload_ok=self._config_ok,
            config_reloads=tuple(sorted(self._reloads.items())),
            dry_run=self.config.dry_run,
            snapshot=snapshot,
            gpus=tuple(statuses),
            decision_counts=self._frozen(self._decision_counts),
            action_counts=self._frozen(self._action_counts),
            read_errors=self._frozen(self._read_errors),
            tick_count=self._tick_count,
            tick_duration_s=self._tick_last_s,
            tick_bucket_counts=tuple(self._tick_buckets),
            lateness_bucket_counts=tuple(self._late_buckets),
            lateness_sum_s=self._late_sum_s,
            lateness_count=self._late_count,
            tick_failures=self._tick_failures,
            tick_duration_sum_s=self._tick_sum_s,
            last_poll_wall_s=snapshot.wall_time_s,
            state_write_errors=self.originals.write_errors,
            ready=self._ready and not self.waiting_reason,
            poll_interval_s=self.config.poll_interval_s,
            class_budgets=tuple(
                (c.name, c.budget_bytes)
                for c in (*self.config.vram.classes, self.config.vram.default_class)
                if c.budget_bytes is not None
            ),
            reserve_bytes=self.config.vram.reserve_bytes,
            process_action_counts=self._frozen(self._process_actions),
            per_process_metrics=self.config.vram.per_process_metrics,
            pid=os.getpid(),
            instance_id=self.instance_id,
            runtime_dir=self.config.runtime_dir,
        )
