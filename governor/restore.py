"""``gpu-governor restore``: put back what a governor that no longer runs left changed.

The daemon puts back every power limit it lowered and every fan it took from the card when
it stops, and the leftovers of a crash when it starts again. A daemon that crashed and is
never started again (systemd gave up restarting it after StartLimitBurst, or it was killed
and left stopped) puts back nothing: its GPUs keep the lowered limits, fans stay under
manual control. This command does what the next start would do first, and only that,
through the same code:

* the same stores, read and checked the same way: the original limits
  (:class:`governor.state.OriginalLimits`) and the fan takeovers
  (:class:`governor.fanstate.FanControl`) in ``state_dir``; a bad file never stops it: it is
  kept aside as ``<name>.corrupt`` with a warning, and (as at a start) every GPU then counts
  as possibly changed by the governor;
* the same restore: a :class:`governor.core.Governor` on the configured backend and
  :func:`governor.core.restore_now` with reason ``restore_after_crash`` (the actuator's
  restore of the limits, the fans handed back to the card);
* the same log events (``power_limit_restored``, ``fan_control_restored``, ...), written by
  :class:`governor.observers.DecisionLog`, then one summary event;
* the same clearing: an entry is dropped once its GPU is back at its original (or its fans
  are back under the card's control), and kept when not (a GPU absent, a write failed) for
  the next start or restore.

Units a ``stop-unit`` class stopped (``stopped-units.json``, :class:`governor.unitstate.StoppedUnitsStore`)
are reported, never started: ``units_left_stopped`` names them (read under the lock, with the
daemon's own store and :class:`governor.unitstate.UnitKeeper`; systemd is not asked anything) and
the list stays on disk for the next start. That is what a clean stop does too: the daemon's stop
starts no unit either, and the next start resumes a unit through the resume rule
(:mod:`governor.rules.units`) once the condition that stopped it has stayed clear for the unit's
delay on the readings of successive ticks. A one-shot command has no such readings, and after a
crash the cause (a game holding the VRAM) usually still holds: starting the units here would
bring back the pressure with no governor left to stop them again. With ``quiet`` after a run
that systemd calls clean (``SERVICE_RESULT=success``) the report is at debug level, since that
daemon's stop said it already.

It refuses while a daemon holds the state directory (:mod:`governor.statelock`): that
daemon governs the GPUs and restores them when it stops. With ``dry_run`` (the config's, or
``--dry-run``) it says what it would put back and changes and clears nothing. The backend is
opened only when something is recorded: after a clean stop (the daemon restored everything
already) it opens no driver and ends at once, which is what the unit's ``ExecStopPost=``
relies on.

Exit codes (governor.errors): 0 everything recorded is back (or nothing was recorded, or a
dry run); 10 a daemon holds the state directory, nothing done; 11 something recorded could
not be put back (kept for the next start or restore) or the state directory cannot be used;
3 an invalid or untrusted config or state directory; 4 no NVIDIA driver; 5 the backend
failed fatally.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from governor.actuator import Actuator
from governor.backends import Backend
from governor.clock import Clock
from governor.config import Config
from governor.core import Governor, check_state_dirs, memory_only_originals, open_stopped_units, restore_now
from governor.errors import (
    EXIT_BACKEND_FATAL,
    EXIT_NOT_RESTORED,
    EXIT_OK,
    BackendFatal,
    CliError,
    GovernorError,
    StateDirBusy,
)
from governor.fanstate import FanControl
from governor.model import Action, ActionResult, Outcome
from governor.observers import DecisionLog, log_units_left_stopped, log_unreadable_state
from governor.state import OriginalLimits
from governor.statelock import try_lock
from governor.units import MemoryUnits
from governor.unitstate import UnitKeeper

RULE = "restore_after_crash"
"""The reason the restored settings are logged under: the leftovers of a governor that did not stop cleanly."""
SERVICE_VARIABLES = ("SERVICE_RESULT", "EXIT_CODE", "EXIT_STATUS")
"""What systemd tells an ``ExecStopPost=`` command about the run that ended: logged as context; only
``SERVICE_RESULT=success`` is acted upon, and only to log ``units_left_stopped`` at debug under ``quiet``."""
MAX_VARIABLE_CHARS = 64


def service_context(environ: Mapping[str, str]) -> dict[str, str]:
    """systemd's account of the run that ended (``service_result``, ``exit_code``, ``exit_status``),
    as far as the environment has it; text only, cut to a bounded length, never acted upon."""
    return {name.lower(): environ[name][:MAX_VARIABLE_CHARS] for name in SERVICE_VARIABLES if name in environ}


def restore_leftovers(
    config: Config,
    open_backend: Callable[[Config], Backend],
    clock: Clock,
    log: Any,
    *,
    quiet: bool = False,
    private_simulation: bool = False,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Put back every power limit and fan recorded in ``config``'s ``state_dir``; the exit code.

    ``open_backend`` opens the configured backend (raising a GovernorError with its exit code when
    it cannot); it is called only when something is recorded. ``quiet``: nothing recorded is
    logged at debug level only (the unit's ``ExecStopPost=`` after a clean stop), and so are the
    units left stopped when ``SERVICE_RESULT=success`` (``environ``, default os.environ).
    ``private_simulation``: a simulation whose config names no ``state_dir``, which ``run`` keeps
    in a private directory of its own: nothing is recorded where this command could look. Raises
    :class:`StateDirBusy` (exit 10) while another gpu-governor process holds the state directory,
    ConfigError (exit 3) for a state directory others may write.
    """
    if memory_only_originals(config):
        _nothing(log, quiet, "the simulated backend without [simulation] state_file keeps nothing between runs")
        return EXIT_OK
    if private_simulation:
        _nothing(log, quiet, "a simulation whose config names no state_dir keeps its state in a private directory")
        return EXIT_OK
    state_dir = Path(config.state_dir)
    check_state_dirs(replace(config, runtime_dir=""))  # the daemon's own trust check of state_dir
    if not state_dir.exists():
        _nothing(log, quiet, f"{state_dir} does not exist")
        return EXIT_OK
    try:
        lock = try_lock(state_dir)
    except StateDirBusy as busy:
        raise StateDirBusy(
            busy.path,
            busy.holder_pid,
            f"{busy.why}: a governor daemon running on this state directory governs its GPUs and puts "
            "their settings back itself when it stops; nothing restored",
        ) from None
    except OSError as exc:
        why = f"cannot lock the state directory: {exc.strerror or exc}; nothing restored"
        raise CliError(why, EXIT_NOT_RESTORED) from None
    with lock:
        originals = OriginalLimits(state_dir)
        fans = FanControl(state_dir)
        keeper = UnitKeeper(open_stopped_units(config), MemoryUnits())  # read only: restore asks systemd nothing
        log_unreadable_state(log, originals, fans)
        if keeper.store.load_warning:
            log.warning("stopped_units_unreadable", detail=keeper.store.load_warning)
        environ = os.environ if environ is None else environ
        limits, fan_gpus = originals.items(), fans.items()
        if not (originals.recorded() or originals.corrupt_seen or fan_gpus or fans.suspect):
            _nothing(log, quiet, f"{state_dir} records no changed power limit and no fan taken from the card")
            _units_left_stopped(config, log, keeper, quiet, environ)
            return EXIT_OK
        log.info(
            "restore_starting",
            state_dir=str(state_dir),
            limits=len(limits),
            fan_gpus=len(fan_gpus),
            suspect=originals.corrupt_seen or fans.suspect,
            dry_run=config.dry_run,
            **service_context(environ),
        )
        results = _restore(config, open_backend, clock, log, originals, fans, keeper)
        _units_left_stopped(config, log, keeper, quiet, environ)
        return _finish(config, log, state_dir, results, originals, fans)


def _restore(
    config: Config,
    open_backend: Callable[[Config], Backend],
    clock: Clock,
    log: Any,
    originals: OriginalLimits,
    fans: FanControl,
    keeper: UnitKeeper,
) -> tuple[ActionResult, ...]:
    """The daemon's restore (a governor on the backend, restore_now), its report logged as the daemon logs it."""
    try:
        backend = open_backend(replace(config, wait_for_driver=False))  # now or never: no waiting for a driver
    except GovernorError as exc:
        raise CliError(f"{exc}; nothing restored, {config.state_dir} keeps every entry", exc.exit_code) from None
    try:
        gpus = tuple(backend.gpus())
        actuator = Actuator(backend, originals, gpus, dry_run=config.dry_run, fans=fans)
        governor = Governor(config, backend, originals, actuator=actuator, gpus=gpus, keeper=keeper)
        try:
            report = restore_now(governor, RULE, clock)
        except BackendFatal as exc:  # the settings not put back yet stay recorded
            raise CliError(
                f"{exc}; what was not restored stays recorded in {config.state_dir}", EXIT_BACKEND_FATAL
            ) from None
        DecisionLog(log).observe(report)
        return report.results
    finally:
        backend.close()


def _finish(
    config: Config,
    log: Any,
    state_dir: Path,
    results: tuple[ActionResult, ...],
    originals: OriginalLimits,
    fans: FanControl,
) -> int:
    """Log the summary; EXIT_NOT_RESTORED when a recorded change is still recorded after a real restore."""
    counts = {outcome: sum(1 for r in results if r.outcome is outcome) for outcome in Outcome}
    if config.dry_run:
        log.info(
            "restore_dry_run_finished",
            state_dir=str(state_dir),
            would=counts[Outcome.DRY_RUN],
            unchanged=counts[Outcome.UNCHANGED],
        )
        return EXIT_OK
    left = [f"{uuid} power limit {watts:g} W" for uuid, watts in originals.items()]
    left += [f"{uuid} fans ({count})" for uuid, count in fans.items()]
    errors = [e for e in (originals.last_error, fans.last_error) if e]
    if left or errors:
        failed = [r for r in results if r.outcome not in (Outcome.APPLIED, Outcome.UNCHANGED)]
        log.error(
            "restore_incomplete",
            state_dir=str(state_dir),
            left=left,
            detail="; ".join([*(_why(r) for r in failed), *errors]) or "see the events above",
        )
        return EXIT_NOT_RESTORED
    log.info(
        "restore_finished",
        state_dir=str(state_dir),
        restored=counts[Outcome.APPLIED],
        unchanged=counts[Outcome.UNCHANGED],
    )
    return EXIT_OK


def _units_left_stopped(config: Config, log: Any, keeper: UnitKeeper, quiet: bool, environ: Mapping[str, str]) -> None:
    """Say which units the governor stopped stay stopped: this command starts none (see the module
    docstring). ``quiet`` after a run systemd calls clean (``SERVICE_RESULT=success``): at debug
    only, since that daemon's own stop said it already (``units_left_stopped``)."""
    stopped = keeper.statuses(None, config.vram)
    if not stopped:
        return
    clean = quiet and environ.get("SERVICE_RESULT") == "success"
    first = "gpu-governor restore starts no unit (the memory pressure or budget that stopped it may still hold); "
    log_units_left_stopped(log, stopped, first=first, level="debug" if clean else "warning")


def _why(result: ActionResult) -> str:
    """One failed restore step in words: the GPU, what, and why."""
    d = result.decision
    what = f"fan {d.fan}" if d.action is Action.SET_FAN_AUTO else "power limit"
    return f"{d.gpu_uuid} {what}: {result.detail or result.outcome.value}"


def _nothing(log: Any, quiet: bool, detail: str) -> None:
    """Nothing is recorded: said at info, or only at debug when ``quiet``."""
    if quiet:
        log.debug("restore_nothing_recorded", detail=detail)
    else:
        log.info("restore_nothing_recorded", detail=detail)
