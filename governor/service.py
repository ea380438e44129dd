"""The service: the schedule and the signals around a :class:`governor.core.Governor`.

One thread does all the work; signals only wake the loop (governor.waiting). Ticks run on a drift-free schedule
(start + k * interval): a late tick does not shift the ones after it, missed ticks are skipped, not run in a burst.
Each tick reads the GPUs, steps the governor and hands its report to the observers. A reload builds a new governor.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from governor import waiting
from governor.backends import Backend, BackendFatal
from governor.clock import Clock
from governor.config import Config, ConfigError, load_config
from governor.core import (
    TICK,
    Governor,
    Inspector,
    Observer,
    TickReport,
    as_config_error,
    observe_all,
    open_originals,
    pinned_changes,
    reclamp_now,
    restore_now,
    status_line,
)
from governor.listener import MetricsListener
from governor.model import Outcome, PublishedState, Snapshot
from governor.notify import Notifier
from governor.observers import DecisionLog, NotifyStatus, ProcessTable, Telemetry, apply_logging, default_logger
from governor.reloadack import ReloadAcks
from governor.units import UnitManager
from governor.waiting import RELOAD, RELOAD_SETTLE_MAX_S, RELOAD_SETTLE_S, STOP, PipeWaiter, Waiter, settle


class Service:
    """Runs a governor: start, tick on schedule, reload, stop; observers see every report."""

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
        inspector: Inspector | None = None,
        observers: Sequence[Observer] | None = None,
        log: Any = None,
        units: UnitManager | None = None,
    ) -> None:
        self.config_path = config_path
        self.backend = backend
        self.clock = clock
        self.waiter: Waiter = waiter if waiter is not None else PipeWaiter(clock)
        self.notifier = notifier if notifier is not None else Notifier()
        self._load = load
        self.log = log if log is not None else default_logger()
        self.governor = Governor(config, backend, open_originals(config), inspector=inspector, units=units)
        self.instance_id = uuid.uuid4().hex  # names this run in the metrics and in processes.json
        self.decision_log = DecisionLog(self.log)
        table = ProcessTable(self.log, self.instance_id)  # before the telemetry: it publishes the last write
        self.telemetry = Telemetry(clock.wall(), self.instance_id, table=table)  # observes only among the observers
        self._status = NotifyStatus(self.notifier)
        self.acks = ReloadAcks(config.runtime_dir, self.notifier, self.telemetry.republish, self.log)  # pinned dir
        published, listening = (lambda: self.published), self.decision_log.listening
        self.listener = MetricsListener(metrics_server_factory, published, self.log, clock, listening)
        if observers is None:
            observers = (self.decision_log, table, self.telemetry, self.listener, self._status)
        self.observers = tuple(observers)
        self.report: TickReport | None = None
        self._touched = False  # the start got as far as the crash restore: a stop must put limits back
        self.reload_settle_s, self.reload_settle_max_s = RELOAD_SETTLE_S, RELOAD_SETTLE_MAX_S  # seconds

    @property
    def config(self) -> Config:
        """The config in force."""
        return self.governor.config

    @property
    def published(self) -> PublishedState | None:
        """What the metrics render (None before the first tick, or without telemetry)."""
        return self.telemetry.published

    @property
    def snapshot(self) -> Snapshot | None:
        """The last tick's snapshot."""
        return None if self.report is None else self.report.snapshot

    def install_signal_handlers(self) -> None:
        """SIGHUP reloads, SIGTERM and SIGINT stop: the signals only wake the loop's waiter."""
        if isinstance(self.waiter, PipeWaiter):
            return self.waiter.install_signal_handlers()
        for signum, event in ((signal.SIGHUP, RELOAD), (signal.SIGTERM, STOP), (signal.SIGINT, STOP)):
            signal.signal(signum, lambda *_, event=event: self.waiter.put(event))
        return None

    def request_stop(self) -> None:
        """Ask the loop to stop (thread-safe)."""
        self.waiter.put(STOP)

    def request_reload(self) -> None:
        """Ask the loop to reload its config (thread-safe)."""
        self.waiter.put(RELOAD)

    def status_line(self) -> str:
        """A one-line summary for systemd's STATUS= and humans."""
        return status_line(self.report, self.governor.waiting_reason)

    def _observe(self, report: TickReport) -> None:
        if report.kind == TICK:
            self.report = report
        observe_all(self.observers, report, self.log, self.telemetry.failed)

    def start(self) -> None:
        """Restore leftovers of a crash, take the first snapshot, bind metrics, send READY."""
        governor = self.governor
        if issues := governor.contradictions():
            raise ConfigError(issues)
        self.decision_log.starting(governor)
        self._touched = True
        snapshot = governor.backend.read()
        leftovers = governor.restore(snapshot, snapshot.t_s, "restore_after_crash", self.clock.wall())
        self._observe(leftovers)
        if any(r.outcome is Outcome.APPLIED for r in leftovers.results):
            snapshot = governor.backend.read()
        self._observe(governor.step(snapshot, self.clock.wall()))
        governor.live = True
        self.listener.bind()  # an address in use or not up yet: governing goes on, bound again later
        self.telemetry.set_ready()
        self._status.live = True
        self.notifier.ready(self.status_line())
        self.log.info("governor_ready", status=self.status_line())

    def run(self) -> int:
        """Start, loop until asked to stop, then stop (after a failed start too: limits go back); the exit code."""
        try:
            self.start()
            self._loop()
        except BackendFatal as exc:
            self.log.critical("backend_fatal", error=str(exc))
            return 5  # after the stop below
        finally:  # a start refused before it touched anything (a contradiction) only closes: one error line
            (self.stop if self._touched else self._close)()
        return 0

    def _loop(self) -> None:
        interval, origin, k = self.config.poll_interval_s, self.clock.monotonic(), 1
        watchdog_s = self.notifier.watchdog_interval_s  # pinged between ticks too: a long interval is no hang
        ping_every_s = None if watchdog_s is None else watchdog_s / 2
        while True:
            deadline = origin + k * interval
            events = waiting.wait_pinging(self.waiter, self.clock, deadline, self.notifier.watchdog, ping_every_s)
            if STOP in events:
                return
            if RELOAD in events:  # a storm of SIGHUPs arrives here drained: one reload, then the tick if due
                self.reload()
                if self.config.poll_interval_s != interval:  # the next tick no later than the old schedule's
                    interval, k = self.config.poll_interval_s, 1
                    origin = min(deadline, self.clock.monotonic() + interval) - interval
                    deadline = origin + interval
            now = self.clock.monotonic()
            if now < deadline:
                continue
            self.telemetry.late(now - deadline)
            try:
                self.tick()
            except BackendFatal:
                raise
            except Exception as exc:  # a bug or an unforeseen hardware error must not stop governing
                self.log.exception("tick_failed", error=str(exc), failures=self.telemetry.failed())
            k = max(k + 1, int((self.clock.monotonic() - origin) // interval) + 1)

    def tick(self) -> None:
        """One cycle: read every GPU, step the governor, let every observer see the report."""
        self.telemetry.tick_began()
        snapshot = self.governor.read()
        self._observe(self.governor.step(snapshot, self.clock.wall()))

    def reload(self) -> bool:
        """Validate the config file first; swap in a governor built from it only if whole and valid."""
        self.acks.begin()  # RELOADING=1
        old = self.config
        try:
            if self.config_path is None:
                raise ConfigError([])
            if not settle(
                self.config_path, self.clock, self.waiter, self.reload_settle_s, self.reload_settle_max_s, self.log
            ):
                return False  # asked to stop while waiting: the stop comes next
            new, pinned = pinned_changes(old, self._load(self.config_path))
            governor = self.governor.rebuilt(new)  # refuses a config these GPUs cannot follow
        except Exception as exc:  # no file, however broken, may stop the governor
            self._reload_failed(exc)
            return False
        self.governor = governor
        if new.logging != old.logging:
            apply_logging(new.logging.format, new.logging.level)
        for key, running, requested in pinned:
            self.log.warning("config_change_needs_restart", config=str(self.config_path), key=key, running=running,
                             requested=requested)  # fmt: skip
        if new.dry_run and not old.dry_run:  # what the enforcing run set goes back: a dry run changes nothing
            self._observe(restore_now(governor, "restore_on_stop", self.clock, force=True))
        if (moved := reclamp_now(governor, self.clock)) is not None:  # GPUs onto a changed ladder, at once
            self._observe(moved)
        self.telemetry.reloaded(ok=True, wall_s=self.clock.wall())
        self.log.info(
            "config_reloaded",
            config=new.source,
            step_down_at_c=new.power.step_down_at_c,
            step_up_at_c=new.power.step_up_at_c,
        )
        self.acks.applied(self.status_line())  # READY=1, then runtime_dir/reload.json (gpu-governor reload)
        return True

    def _reload_failed(self, exc: Exception) -> None:
        errors = as_config_error(exc, self.config_path).summary() or ["no config file to reload"]
        self.telemetry.reloaded(ok=False, wall_s=None)
        self.log.error("config_reload_failed", config=str(self.config_path), errors=errors, kept=self.config.source)
        self.acks.refused(errors, self.status_line())

    def stop(self) -> None:
        """STOPPING=1, restore every original limit, release the hardware and the port."""
        self.notifier.stopping()
        self.log.info("governor_stopping")
        try:  # a fatal error while restoring still closes the port and the backend (originals stay saved)
            self._observe(restore_now(self.governor, "restore_on_stop", self.clock))
        finally:
            self._close()
        self.log.info("governor_stopped")

    def _close(self) -> None:
        if isinstance(self.waiter, PipeWaiter):
            self.waiter.close()
        self.listener.close()
        self.backend.close()
