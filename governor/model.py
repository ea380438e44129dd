"""Frozen value types shared by every module: GPU facts, readings, snapshots, decisions.

Units live in field names (``_c`` degrees Celsius, ``_w`` watts, ``_bytes`` bytes,
``_s`` seconds). A reading the hardware could not give is ``None``, never ``0``.
Times (``t_s``) are seconds on the monotonic clock of whoever took the snapshot (the
real monotonic clock for NVML, the virtual clock for the simulator); rules take their
notion of "now" from the snapshot alone.
"""

from __future__ import annotations

# ruff: noqa: PLC0414 - "import X as X" marks a re-export (names that moved to governor.policy/schema)
import enum
import inspect
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ParamSpec, TypeVar

# Defined in governor.policy; re-exported here, where every reader found them before.
from governor.policy import ZONES_BY_SEVERITY as ZONES_BY_SEVERITY
from governor.policy import Action as Action
from governor.policy import Rule as Rule
from governor.policy import ThermalZone as ThermalZone

_T = TypeVar("_T")
_P = ParamSpec("_P")
_FACTORY = object()
"""The default of a field with a default factory in a :func:`fast_init` constructor (called when left)."""


def fast_init(cls: type[_T]) -> type[_T]:
    """A frozen slots dataclass ``cls`` with a faster constructor; apply it above ``@dataclass``.

    The dataclass's own ``__init__`` sets each field through ``object.__setattr__`` (its
    ``__setattr__`` refuses), about 0.25 us a field on CPython 3.11: 4-5 us for the readings and
    reports built every tick. This one turns the half-built instance into a plain twin class
    with the same slots (no ``__setattr__`` of its own), stores the fields as ordinary
    attributes and turns it back, in under half the time. Nothing else changes: the
    parameters, defaults and default factories are the dataclass's, the instance's type is
    ``cls`` (frozen: assignment raises FrozenInstanceError), and ``fields``, ``replace``,
    equality, hashing, ``repr``, copy and pickle are the dataclass's own.

    Raises TypeError for a class it does not fit (not a frozen slots dataclass, or with an
    ``__post_init__``, a field left out of ``__init__`` or a keyword-only field).
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__ or hasattr(cls, "__post_init__"):
        raise TypeError(f"fast_init: {cls.__name__} is not a frozen slots dataclass without __post_init__")
    names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    if cls.__dict__["__slots__"] != names:
        raise TypeError(f"fast_init: the slots of {cls.__name__} are not its fields")
    twin = type(f"_{cls.__name__}Fields", (), {"__slots__": names, "__module__": cls.__module__})
    scope: dict[str, Any] = {"_cls": cls, "_twin": twin, "_set": object.__setattr__, "_FACTORY": _FACTORY}
    args, body = ["self"], ["    _set(self, '__class__', _twin)"]
    for f in fields(cls):  # type: ignore[arg-type]
        if not f.init or f.kw_only is True:
            raise TypeError(f"fast_init: {cls.__name__}.{f.name} is not a plain __init__ parameter")
        if f.default is not MISSING:
            scope[f"_default_{f.name}"] = f.default
            args.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not MISSING:
            scope[f"_factory_{f.name}"] = f.default_factory
            args.append(f"{f.name}=_FACTORY")
            body.append(f"    if {f.name} is _FACTORY: {f.name} = _factory_{f.name}()")
        else:
            args.append(f.name)
        body.append(f"    self.{f.name} = {f.name}")
    body.append("    self.__class__ = _cls")
    exec(f"def __init__({', '.join(args)}) -> None:\n" + "\n".join(body), scope)  # noqa: S102 - built from field names
    init = scope["__init__"]
    init.__qualname__, init.__module__ = f"{cls.__qualname__}.__init__", cls.__module__
    setattr(cls, "__init__", init)  # noqa: B010 - mypy refuses assigning a method
    return cls


def constructor(cls: Callable[_P, _T]) -> Callable[_P, _T]:
    """A plain function that builds ``cls``: the same parameters as its ``__init__`` (names, order,
    defaults), passed on to ``cls`` by position.

    A class called with keyword arguments first gathers them into a dict (CPython's call of a
    class has no fast path for keywords): about 60 ns a keyword on CPython 3.11, a microsecond
    for the report built every tick. A function takes keywords without one, so the values
    built every tick are made through this, their fields still named at the call.

    Raises TypeError when ``cls.__init__`` is not a Python function of plain parameters (no
    keyword-only ones, no ``*args`` or ``**kwargs``).
    """
    init = getattr(cls, "__init__", None)
    code = getattr(init, "__code__", None)
    if code is None or code.co_kwonlyargcount or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        raise TypeError(f"constructor: {cls!r} has no __init__ of plain parameters")
    names = code.co_varnames[1 : code.co_argcount]  # after self
    scope: dict[str, Any] = {"_cls": cls}
    exec(f"def new({', '.join(names)}):\n    return _cls({', '.join(names)})", scope)  # noqa: S102 - field names
    new: Callable[_P, _T] = scope["new"]
    setattr(new, "__defaults__", getattr(init, "__defaults__", None))  # noqa: B010 - mypy refuses the assignment
    setattr(new, "__qualname__", f"constructor({getattr(cls, '__qualname__', cls)!s})")  # noqa: B010
    return new


class GpuHealth(enum.Enum):
    """How far the governor can trust and act on a GPU."""

    OK = "ok"
    DEGRADED = "degraded"  # some reading missing; rules hold rather than act
    LOST = "lost"  # the GPU stopped answering (NVML GPU_IS_LOST or similar)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Facts about one GPU, read when the backend opens it. The power-limit range and default can
    change at runtime (an admin, a BMC, a mode change, a driver reload): a backend may read them
    again and hand out a new GpuInfo, which the core follows (``Backend.gpus``)."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str | None = None
    power_limit_min_w: float | None = None
    power_limit_max_w: float | None = None
    power_limit_default_w: float | None = None
    temperature_slowdown_c: float | None = None
    temperature_shutdown_c: float | None = None
    memory_total_bytes: int | None = None
    driver_version: str | None = None
    fan_count: int | None = None  # None: the GPU cannot say (NotSupported: a data-center board)
    fan_speed_min_percent: float | None = None  # the lowest speed a fan may be set to (percent of its maximum)
    fan_speed_max_percent: float | None = None


MAX_PLAUSIBLE_W = 10_000.0
"""No single GPU draws or may be limited to this many watts (the largest today are about 1.2 kW):
a power value at or above it (NVML's unsigned 0xFFFFFFFF mW is 4.3 MW) is a broken answer."""


def plausible_w(watts: float | None) -> bool:
    """True for a power value (W) a GPU can have: finite, above 0, below :data:`MAX_PLAUSIBLE_W`."""
    return watts is not None and 0.0 < watts < MAX_PLAUSIBLE_W


def plausible_draw_w(watts: float | None) -> bool:
    """True for a power draw (W) a GPU can read: finite, 0 or more (an idle board may read 0 W), below
    :data:`MAX_PLAUSIBLE_W`."""
    return watts is not None and 0.0 <= watts < MAX_PLAUSIBLE_W


MAX_PLAUSIBLE_C = 150.0
"""No GPU reads this hot and still answers (cards shut down at about 95-105 C): a temperature at or above
it (255 or 65535 C, a sensor's all-ones error value) is a broken answer, and so is one at or below 0 C."""


def plausible_c(temperature_c: float | None) -> bool:
    """True for a GPU temperature (C) a working sensor can read: above 0, below :data:`MAX_PLAUSIBLE_C`."""
    return temperature_c is not None and 0.0 < temperature_c < MAX_PLAUSIBLE_C


MAX_OVER_DEFAULT = 4.0
"""No card allows a power limit this many times its default (the widest known, an RTX 4090, allows
600 W over a 450 W default): a maximum above it is a broken answer, not a range to clamp to."""


def checked_power_range(
    min_w: float | None, max_w: float | None, default_w: float | None
) -> tuple[float | None, float | None, float | None, str | None]:
    """A card's power-limit range and default (W) as the governor may use them, and what was wrong.

    A range that is not two plausible values with min <= max is unknown (both None: the card's
    limit is never changed); a default that is not plausible or lies outside the range is unknown
    too; a range whose maximum is over :data:`MAX_OVER_DEFAULT` times its (plausible, inside) default
    is unknown, the default kept. The fourth value names what was dropped (None when nothing was)."""
    problems = []
    if (min_w is not None or max_w is not None) and not (
        plausible_w(min_w) and plausible_w(max_w) and min_w <= max_w  # type: ignore[operator]
    ):
        problems.append(f"power limit range {min_w}-{max_w} W")
        min_w = max_w = None
    if default_w is not None and not (
        plausible_w(default_w) and (min_w is None or min_w <= default_w) and (max_w is None or default_w <= max_w)
    ):
        problems.append(f"default power limit {default_w} W")
        default_w = None
    if max_w is not None and default_w is not None and max_w > MAX_OVER_DEFAULT * default_w:
        problems.append(f"power limit range {min_w}-{max_w} W, over {MAX_OVER_DEFAULT:g}x the default {default_w} W")
        min_w = max_w = None
    return min_w, max_w, default_w, ("; ".join(problems) if problems else None)


PowerRange = tuple[float | None, float | None, float | None]
"""A card's power-limit (min, max, default) in watts; None where unknown."""


def refreshed_power_range(
    last: PowerRange, min_w: float | None, max_w: float | None, default_w: float | None
) -> tuple[PowerRange, str | None, bool]:
    """A card's power-limit range and default (W) read again, against ``last``, the values in force.

    What passes :func:`checked_power_range` is used. A part that fails it keeps its last value when it
    has one: the range, and the default when the last one still passes with the range used; without
    one it is None, as at open. Returns the values to use, what the read gave that was dropped (None
    when nothing was) and whether a last value was kept in its place."""
    low, high, default, problem = checked_power_range(min_w, max_w, default_w)
    kept = False
    if low is None and (min_w is not None or max_w is not None) and last[0] is not None and last[1] is not None:
        low, high, kept = last[0], last[1], True
        default = default_w if checked_power_range(low, high, default_w)[3] is None else None
    last_default = last[2]
    if default is None and default_w is not None and checked_power_range(low, high, last_default)[3] is None:
        default, kept = last_default, last_default is not None
    return (low, high, default), problem, kept


@dataclass(frozen=True, slots=True)
class ProcessReading:
    """One process using a GPU, as the backend saw it in this tick."""

    pid: int
    used_memory_bytes: int | None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class MigInstanceReading:
    """One MIG device of a GPU in MIG mode (a compute instance, named by its own ``MIG-`` UUID), as
    the backend read it in this tick.

    ``index`` is its MIG device index under the parent GPU (NVML's
    nvmlDeviceGetMigDeviceHandleByIndex); ``memory_used_bytes``/``memory_total_bytes`` are the
    instance's own VRAM (None when NVML could not give them: never 0); ``processes`` the compute
    processes running in it, each with the bytes it uses in this instance (None when NVML cannot say);
    ``gpu_instance_id`` the GPU instance it is a compute instance of (the MIG devices of one GPU
    instance share its memory; None when NVML cannot say).
    """

    uuid: str
    index: int
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    processes: tuple[ProcessReading, ...] = ()
    gpu_instance_id: int | None = None


CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)
"""NVML clock event (throttle) reason bits and the names they are exported as (``reason`` label)."""


@dataclass(frozen=True, slots=True)
class GpuTelemetry:
    """What a GPU reports about its health that changes slowly or rarely; no rule reads it,
    the metrics show it. A backend builds a new one only when something in it changed, so
    a tick usually shares the last one.

    Missing is ``None`` (NVML said NotSupported, or the read failed), never 0. Memory
    clock in MHz; ``pstate`` the performance state, 0 (P0, fastest) .. 15; memory
    temperature in degrees C; fan speeds as ratios 0-1 (NVML's percent / 100) per fan
    index; ``xid_errors`` XID errors by code since the backend opened (``None``: XID
    events cannot be watched on this GPU); ``ecc_errors`` ECC error counts by
    (``corrected``/``uncorrected``, ``volatile``/``aggregate``). Remapped rows: counts of
    rows remapped for correctable and uncorrectable errors, a remapping pending (until
    the next GPU reset) and a remapping that failed. All but the XID counts are slow
    reads, refreshed on their own cadence and carried forward in between.
    """

    memory_clock_mhz: float | None = None
    pstate: int | None = None
    memory_temperature_c: float | None = None
    fan_speed_ratios: tuple[tuple[int, float], ...] | None = None
    xid_errors: tuple[tuple[int, int], ...] | None = None
    ecc_errors: tuple[tuple[str, str, int], ...] | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_pending: bool | None = None
    row_remap_failed: bool | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class GpuReading:
    """Live values of one GPU at one instant. Missing values are ``None``.

    ``error`` holds a short, human-readable reason when the whole read failed
    (``health`` is then ``LOST`` or ``DEGRADED``). ``clock_event_s`` is the cumulative seconds each clock event
    reason (a name of :data:`CLOCK_EVENT_REASONS`) was active; ``telemetry`` the slow and
    rarely changing rest (:class:`GpuTelemetry`).

    MIG (Multi-Instance GPU): ``mig_enabled`` is the GPU's current MIG mode (read on a slow
    cadence; None when unknown or the GPU has no MIG). ``mig_instances`` holds each MIG device's
    memory and processes when the GPU is in MIG mode and they could be read this tick; then
    ``processes`` lists each process once with its bytes summed over the instances of this GPU it
    runs in, and memory pressure is judged per instance (:mod:`governor.rules.vram`). None: not in
    MIG mode, or the per-instance reads failed (then memory and processes are the parent device's,
    as without MIG support). ``memory_used_bytes``/``memory_total_bytes`` stay the parent's
    (in MIG mode NVML gives the aggregate there, or nothing).
    """

    index: int
    uuid: str
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None  # enforced limit
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization_gpu_ratio: float | None = None  # 0..1
    clock_event_reasons: int | None = None  # NVML bitmask
    sm_clock_mhz: float | None = None
    clock_event_s: tuple[tuple[str, float], ...] | None = None
    power_limit_requested_w: float | None = None  # slow read: refreshed on a slower cadence
    energy_j: float | None = None  # total energy counter; slow read: slower cadence
    processes: tuple[ProcessReading, ...] | None = None
    health: GpuHealth = GpuHealth.OK
    error: str | None = None
    telemetry: GpuTelemetry | None = None  # None: the backend gives none
    mig_enabled: bool | None = None  # current MIG mode; None: unknown, or no MIG on this GPU
    mig_instances: tuple[MigInstanceReading, ...] | None = None  # None: not in MIG mode, or not read


@fast_init
@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every GPU's reading taken in one tick, at monotonic time ``t_s``.

    ``wall_time_s`` is the matching Unix time, for humans and metrics only. ``notes``:
    problems the backend found with its own inputs this tick (an ignored file), each given
    once, when it appears, for the decision log.
    """

    t_s: float
    wall_time_s: float
    gpus: tuple[GpuReading, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """One thing a rule decided, with the reason a human can read back.

    ``rule`` names the rule, ``reading`` is the value it looked at (degrees C for the
    thermal and power rules, bytes for VRAM), ``threshold`` the limit it compared
    against (same unit). What changes is typed by kind, each in its own unit:
    ``from_zone``/``to_zone`` for a zone change, ``from_w``/``to_w`` (watts) for a power
    limit, ``fan`` with ``from_percent``/``to_percent`` (percent of the fan's maximum speed;
    ``to_percent`` None: back to the card's automatic control) for a fan,
    ``pid``/``process_start_time``/``process_class``/``process_name`` for a process target
    (the action says what happens to it) and ``unit`` for the systemd unit a
    ``stop_unit``/``start_unit`` decision (or a kill-restart loop report) is about.
    ``kill_sent_s`` (seconds, the snapshot clock of ``t_s``): for a ``vram_kill_ineffective`` or
    ``vram_kill_given_up`` decision, when the process's first real SIGKILL was sent.
    """

    t_s: float
    gpu_index: int
    gpu_uuid: str
    rule: Rule
    action: Action
    reason: str
    reading: float | None = None
    threshold: float | None = None
    from_w: float | None = None
    to_w: float | None = None
    from_zone: ThermalZone | None = None
    to_zone: ThermalZone | None = None
    pid: int | None = None
    process_start_time: int | None = None
    process_class: str | None = None
    process_name: str | None = None
    dry_run: bool = False  # a process decision under dry-run (per class or [vram] dry_run)
    unit: str | None = None  # the systemd unit a process decision is about (stop_unit, start_unit, loops)
    fan: int | None = None
    from_percent: float | None = None
    to_percent: float | None = None
    kill_sent_s: float | None = None  # a process that outlived a SIGKILL: when the first one was sent (s)

    @property
    def from_value(self) -> float | str | None:
        """The old untyped "before" (zone name, watts, percent or process name), for readers not yet
        on the typed fields."""
        if self.to_zone is not None:
            return None if self.from_zone is None else self.from_zone.value
        if self.pid is not None:
            return self.process_name
        if self.fan is not None:
            return self.from_percent
        return self.from_w

    @property
    def to_value(self) -> float | str | None:
        """The old untyped "after" (zone name, watts, percent or "auto", or the action's name), for readers not yet
        on the typed fields."""
        if self.to_zone is not None:
            return self.to_zone.value
        if self.pid is not None:
            return self.action.value
        if self.fan is not None:
            return "auto" if self.to_percent is None else self.to_percent
        return self.to_w


class Outcome(enum.Enum):
    """What the actuator did with a decision."""

    APPLIED = "applied"
    DRY_RUN = "dry_run"
    UNCHANGED = "unchanged"  # already in force (idempotent)
    FAILED = "failed"
    REFUSED = "refused"  # the GPU or process is not ours to touch (monitor-only, protected)
    SKIPPED = "skipped"  # nothing to do (informational decision, vanished process)


@dataclass(frozen=True, slots=True)
class ActionResult:
    """The actuator's report on one decision; ``process_state``: for a process that outlived a
    SIGKILL, the state letter /proc/PID/stat gave right before the actuator acted (``D``: in
    uninterruptible sleep, ``Z``: a zombie ...; None: not read, or unreadable)."""

    decision: Decision
    outcome: Outcome
    detail: str | None = None
    process_state: str | None = None


@dataclass(frozen=True, slots=True)
class ClassUsage:
    """VRAM use of one process class on one GPU in the last tick: ``used_bytes`` sums what NVML
    reported; ``unreported`` counts the processes whose use it did not report (then the sum is
    only a lower bound, and the metrics leave it out)."""

    name: str
    used_bytes: int
    processes: int
    over_budget: int
    unreported: int = 0


@dataclass(frozen=True, slots=True)
class ProcessRow:
    """One process on one GPU, as classified (exported only when per-process metrics are on)."""

    pid: int
    name: str
    klass: str
    unit: str
    used_bytes: int | None
    why: str


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A decision as the daemon handled it: at ``wall_s`` (Unix time, s), with ``outcome``
    (an :class:`Outcome` value, or ``"reported"`` for a decision that asks for no action)."""

    decision: Decision
    wall_s: float
    outcome: str


@dataclass(frozen=True, slots=True)
class ThermalModelStatus:
    """Target mode's online thermal model of one GPU (governor.rules.fit): whether it is fitted
    yet (else the prior), die-to-room resistance (C/W), room (C), heatsink time constant (s),
    and the 60-seconds-ahead prediction error (C, predicted minus measured; the latest and
    the recent root mean square), None until there is one."""

    fitted: bool
    r_total_c_per_w: float
    ambient_c: float
    tau_s: float
    prediction_error_c: float | None
    prediction_rmse_c: float | None


@dataclass(frozen=True, slots=True)
class FanStatus:
    """One GPU's fans as the governor drives them: the configured ``mode`` (auto, curve,
    assist), the speed it set per fan index (percent; empty while the card's own control
    runs them) and why it cannot drive them (``monitor_only``: no fans NVML can set, a refused
    set, a fan that did not follow; None when it can)."""

    mode: str = "auto"
    targets_percent: tuple[tuple[int, float], ...] = ()
    monitor_only: str | None = None


@dataclass(frozen=True, slots=True)
class GpuStatus:
    """What the governor knows and wants for one GPU after a tick (for metrics and ``status``)."""

    info: GpuInfo
    zone: ThermalZone
    zone_thresholds_c: tuple[tuple[ThermalZone, float], ...]
    ladder_w: tuple[float, ...]
    rung: int | None
    target_w: float | None
    monitor_only: str | None
    last_decision: Decision | None
    last_decision_wall_s: float | None
    classes: tuple[ClassUsage, ...] = ()
    unclassified_processes: int = 0
    memory_pressure: bool | None = None
    processes: tuple[ProcessRow, ...] = ()
    original_limit_saved: bool | None = None  # False: left alone, its original could not be saved
    last_power: DecisionRecord | None = None  # the last power-limit decision (never a zone change)
    last_vram: DecisionRecord | None = None  # the last decision about a process's VRAM
    model: ThermalModelStatus | None = None  # target mode's online thermal model
    fan: FanStatus = FanStatus()
    mig_pressure: tuple[str, ...] = ()  # UUIDs of the GPU's MIG instances under memory pressure


@dataclass(frozen=True, slots=True)
class StoppedUnitStatus:
    """A unit the governor stopped, as published: its class, why it was stopped
    (``memory_pressure`` or ``over_budget``), when (Unix time, s), the resume delay in force (s),
    whether its class resumes it, and when it will be started if the condition stays clear
    (Unix time, s; None while the condition holds or when it is not resumed)."""

    unit: str
    klass: str
    reason: str
    stopped_wall_s: float
    resume_after_s: float
    resume: bool
    resume_wall_s: float | None


@dataclass(frozen=True, slots=True)
class UnitWarning:
    """A unit whose processes a class signals but whose ``Restart=`` undoes the kill."""

    unit: str
    klass: str
    restart: str


TICK_BUCKETS_S: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
"""Histogram bucket bounds (seconds) for the duration of one tick."""


@dataclass(frozen=True, slots=True)
class PublishedState:
    """The immutable state the daemon publishes after each tick; metrics read only this.

    Counters are totals since the daemon started. ``decision_counts`` is keyed by
    (gpu index, gpu uuid, rule, action); ``action_counts`` by (gpu index, gpu uuid,
    action, outcome); ``read_errors`` by (gpu index, gpu uuid).
    """

    version: str
    backend: str
    started_wall_s: float
    config_source: str
    config_loaded_wall_s: float
    config_reload_ok: bool
    config_reloads: tuple[tuple[str, int], ...]  # (result, count)
    dry_run: bool
    snapshot: Snapshot | None
    gpus: tuple[GpuStatus, ...]
    decision_counts: tuple[tuple[tuple[int, str, str, str], int], ...]
    action_counts: tuple[tuple[tuple[int, str, str, str], int], ...]
    read_errors: tuple[tuple[tuple[int, str], int], ...]  # ((gpu index, gpu uuid), count)
    tick_count: int
    tick_duration_s: float | None
    tick_bucket_counts: tuple[int, ...]  # cumulative, per TICK_BUCKETS_S then +Inf
    tick_duration_sum_s: float
    last_poll_wall_s: float | None
    state_write_errors: int
    ready: bool
    poll_interval_s: float = 1.0
    class_budgets: tuple[tuple[str, int], ...] = ()  # (class, bytes)
    reserve_bytes: int = 0
    process_action_counts: tuple[tuple[tuple[str, str, str], int], ...] = ()  # (class, action, outcome)
    per_process_metrics: bool = False
    lateness_bucket_counts: tuple[int, ...] = ()  # cumulative, per TICK_BUCKETS_S
    lateness_sum_s: float = 0.0
    lateness_count: int = 0
    tick_failures: int = 0
    pid: int | None = None  # the daemon's process id
    instance_id: str = ""  # random per daemon start: tells two daemons with a reused pid apart
    runtime_dir: str = ""  # where the daemon writes processes.json ("" for none)
    process_table_written_s: float | None = None  # wall time stamped into the last processes.json written
    process_table_error: str | None = None  # why the daemon can no longer write processes.json
    stopped_units: tuple[StoppedUnitStatus, ...] = ()  # units the governor stopped and has not resumed
    restart_loops: tuple[str, ...] = ()  # units in a kill-restart loop (signalled no more)
    unit_action_counts: tuple[tuple[tuple[str, str, str], int], ...] = ()  # (class, action, outcome)
    systemd_reachable: bool | None = None  # None: systemd was never asked


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """Who a process is, as /proc says (:class:`governor.processes.ProcessInspector`).

    ``start_time`` is in clock ticks since boot (None when the process is not visible);
    together with ``pid`` it names one process for its whole life. ``system_exe``: the
    exe is a root-owned, not group/world-writable file under a system directory;
    ``newer_than_listing``: it started after the GPU process list was read (a reused PID);
    ``exe_elsewhere``: the governor does not find the process's exe at that path (another
    mount namespace: a container, or a user who mounted their own binary there in a user
    namespace of theirs; or a deleted file), so the path matches no class's ``exe`` key.
    """

    pid: int
    start_time: int | None
    name: str | None
    exe: str | None
    cmdline: str | None
    uid: int | None
    user: str | None
    cgroup: str | None
    unit: str | None
    slices: tuple[str, ...]
    kernel_thread: bool
    system_exe: bool = False
    newer_than_listing: bool = False
    exe_elsewhere: bool = False

    @property
    def exe_name(self) -> str | None:
        """The basename of the executable the kernel reports (without " (deleted)")."""
        if self.exe is None:
            return None
        return self.exe.removesuffix(" (deleted)").rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class Classification:
    """The process class a process was given and why; ``protected`` is the reason it must
    never be signalled (None: it may be); ``unresolved``: a pattern match ran out of time,
    so this is the default class for this tick only."""

    klass: str
    why: str
    protected: str | None = None
    unresolved: bool = False


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    """What /proc says about one process (``identity``) and the class it was given
    (``classification``). The attributes of both read through (``facts.pid``,
    ``facts.klass`` ...)."""

    identity: ProcessIdentity
    classification: Classification

    @classmethod
    def of(
        cls,
        pid: int,
        start_time: int | None,
        name: str | None,
        exe: str | None,
        cmdline: str | None,
        uid: int | None,
        user: str | None,
        cgroup: str | None,
        unit: str | None,
        slices: tuple[str, ...],
        kernel_thread: bool,
        klass: str,
        why: str,
        protected: str | None,
        system_exe: bool = False,
        newer_than_listing: bool = False,
        unresolved: bool = False,
    ) -> ProcessFacts:
        """Facts from flat fields (the order of the former flat ProcessFacts)."""
        identity = ProcessIdentity(
            pid, start_time, name, exe, cmdline, uid, user, cgroup, unit, slices, kernel_thread, system_exe,
            newer_than_listing,
        )  # fmt: skip
        return cls(identity, Classification(klass, why, protected, unresolved))

    def classified_as(self, **changes: Any) -> ProcessFacts:
        """These facts with the classification's fields in ``changes`` replaced."""
        return ProcessFacts(self.identity, replace(self.classification, **changes))

    def seen_as(self, **changes: Any) -> ProcessFacts:
        """These facts with the identity's fields in ``changes`` replaced."""
        return ProcessFacts(replace(self.identity, **changes), self.classification)

    # identity
    @property
    def pid(self) -> int:
        """The process id."""
        return self.identity.pid

    @property
    def start_time(self) -> int | None:
        """Start time in clock ticks since boot; None when the process is not visible."""
        return self.identity.start_time

    @property
    def name(self) -> str | None:
        """The command name (/proc/PID/comm, else the name NVML reported)."""
        return self.identity.name

    @property
    def exe(self) -> str | None:
        """The executable's path as the kernel reports it."""
        return self.identity.exe

    @property
    def exe_name(self) -> str | None:
        """The basename of the executable (without " (deleted)")."""
        return self.identity.exe_name

    @property
    def exe_elsewhere(self) -> bool:
        """True when the exe path does not lead to the process's executable here (it matches no ``exe`` key)."""
        return self.identity.exe_elsewhere

    @property
    def cmdline(self) -> str | None:
        """The command line, arguments joined by spaces."""
        return self.identity.cmdline

    @property
    def uid(self) -> int | None:
        """The owner's user id."""
        return self.identity.uid

    @property
    def user(self) -> str | None:
        """The owner's user name."""
        return self.identity.user

    @property
    def cgroup(self) -> str | None:
        """The process's cgroup path."""
        return self.identity.cgroup

    @property
    def unit(self) -> str | None:
        """The systemd unit of its cgroup."""
        return self.identity.unit

    @property
    def slices(self) -> tuple[str, ...]:
        """The systemd slices of its cgroup."""
        return self.identity.slices

    @property
    def kernel_thread(self) -> bool:
        """True for a kernel thread."""
        return self.identity.kernel_thread

    @property
    def system_exe(self) -> bool:
        """The exe is a root-owned, not group/world-writable file under a system directory."""
        return self.identity.system_exe

    @property
    def newer_than_listing(self) -> bool:
        """Started after the GPU process list was read: a reused PID."""
        return self.identity.newer_than_listing

    # classification
    @property
    def klass(self) -> str:
        """The process class's name."""
        return self.classification.klass

    @property
    def why(self) -> str:
        """Why it got that class."""
        return self.classification.why

    @property
    def protected(self) -> str | None:
        """Why it must never be signalled, or None."""
        return self.classification.protected

    @property
    def unresolved(self) -> bool:
        """A pattern match ran out of time: the default class for this tick only."""
        return self.classification.unresolved
