"""Policies are data: the frozen policy types and the enums rules speak in. No I/O.

The rules (:mod:`governor.rules`) import only this module and :mod:`governor.model`;
reading and validating a file into these types is :mod:`governor.config`'s and
:mod:`governor.classes`' job (through :mod:`governor.schema`).

The enums are ``str`` subclasses whose ``str()`` and format are their value, so
``decision.rule == "thermal_zone"`` holds, a dict keyed by the plain name finds them,
and a log line or a metric label prints ``thermal_zone`` exactly as before.

Units live in field names: ``_c`` degrees Celsius, ``_w`` watts, ``_s`` seconds,
``_bytes`` bytes.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from governor.durations import format_seconds

if TYPE_CHECKING:  # the regex module loads only when a config has a cmdline or cgroup pattern
    import regex

__all__ = [
    "ACTING_ACTIONS",
    "ACTIONS",
    "BINARY_UNITS",
    "DEFAULT_CLASS",
    "DEFAULT_PROTECTED_NAMES",
    "DENIED_UNITS",
    "MATCH_KEYS",
    "MESSAGE_VALUE_CHARS",
    "SESSION_UNITS",
    "SIGNAL_ACTIONS",
    "UNTRUSTED_KEYS",
    "ZONES_BY_SEVERITY",
    "Action",
    "FanMode",
    "FanPolicy",
    "GpuPolicy",
    "NodePolicy",
    "PowerPolicy",
    "ProcessAction",
    "ProcessClass",
    "ProcessMatch",
    "Rule",
    "Rung",
    "ThermalPolicy",
    "ThermalZone",
    "VramPolicy",
    "clip",
    "denied_unit",
    "format_seconds",
    "format_size",
    "percent_of",
    "session_unit",
]


class StrEnum(str, enum.Enum):
    """An enum whose members are their value as text (``enum.StrEnum`` of Python 3.11, on 3.10 too)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)


# --------------------------------------------------------------------------- enums


class Rule(StrEnum):
    """Which rule (or actuator duty) made a decision; the value is the name logs and metrics show."""

    THERMAL_ZONE = "thermal_zone"
    POWER_HOLD = "power_hold"
    POWER_CRITICAL = "power_critical"
    POWER_STEP_DOWN = "power_step_down"
    POWER_STEP_UP = "power_step_up"
    POWER_TARGET_DOWN = "power_target_down"
    POWER_TARGET_UP = "power_target_up"
    NODE_BUDGET = "node_budget"
    POWER_DRIFT_REAPPLY = "power_drift_reapply"
    POWER_DRIFT_EXTERNAL_LOWER = "power_drift_external_lower"
    VRAM_OVER_BUDGET = "vram_over_budget"
    VRAM_ENFORCE = "vram_enforce"
    VRAM_ESCALATE = "vram_escalate"
    VRAM_KILL_INEFFECTIVE = "vram_kill_ineffective"  # still listed and over budget kill_after_s after a SIGKILL
    VRAM_KILL_GIVEN_UP = "vram_kill_given_up"  # still so after every SIGKILL sent again: no more are sent
    UNIT_RESUME = "unit_resume"
    UNIT_RESTART_LOOP = "unit_restart_loop"
    FAN_CURVE = "fan_curve"
    FAN_ASSIST = "fan_assist"
    FAN_RELEASE = "fan_release"
    FAN_NOT_FOLLOWING = "fan_not_following"
    RESTORE_ON_STOP = "restore_on_stop"
    RESTORE_AFTER_CRASH = "restore_after_crash"


class Action(StrEnum):
    """What a decision asks the actuator to do."""

    NONE = "none"  # informational (zone change, hold, report)
    SET_POWER_LIMIT = "set_power_limit"
    SIGNAL_TERM = "sigterm"
    SIGNAL_KILL = "sigkill"
    STOP_UNIT = "stop_unit"
    START_UNIT = "start_unit"
    SET_FAN_SPEED = "set_fan_speed"
    SET_FAN_AUTO = "set_fan_auto"  # hand a fan back to the card's automatic control


class ThermalZone(StrEnum):
    """Named temperature bands, ordered from coolest to hottest."""

    OPTIMAL = "optimal"
    WARNING = "warning"
    HOT = "hot"
    THROTTLE = "throttle"
    CRITICAL = "critical"
    UNKNOWN = "unknown"

    @property
    def severity(self) -> int:
        """Rank of the zone: 0 for optimal up to 4 for critical; -1 for unknown."""
        return _SEVERITY[self]


_SEVERITY = {
    ThermalZone.OPTIMAL: 0,
    ThermalZone.WARNING: 1,
    ThermalZone.HOT: 2,
    ThermalZone.THROTTLE: 3,
    ThermalZone.CRITICAL: 4,
    ThermalZone.UNKNOWN: -1,
}

ZONES_BY_SEVERITY: tuple[ThermalZone, ...] = (
    ThermalZone.OPTIMAL,
    ThermalZone.WARNING,
    ThermalZone.HOT,
    ThermalZone.THROTTLE,
    ThermalZone.CRITICAL,
)


class ProcessAction(StrEnum):
    """What a process class does to a process over its budget."""

    OBSERVE = "observe"  # report only
    TERMINATE = "terminate"  # SIGTERM, then SIGKILL after kill_after_s
    KILL = "kill"  # SIGKILL
    STOP_UNIT = "stop-unit"  # systemd StopUnit on the process's system unit (D-Bus); resumed when asked


ACTIONS: tuple[ProcessAction, ...] = tuple(ProcessAction)
SIGNAL_ACTIONS: tuple[ProcessAction, ...] = (ProcessAction.TERMINATE, ProcessAction.KILL)
ACTING_ACTIONS: tuple[ProcessAction, ...] = (*SIGNAL_ACTIONS, ProcessAction.STOP_UNIT)
"""Actions that change something (a signal or a stopped unit): they need a trusted match key."""


# --------------------------------------------------------------------------- thermal and power

Rung = float | str
"""One ladder rung: watts (float) or a percentage of the card's default limit ("90%")."""


def percent_of(rung: str) -> float:
    """The percentage of a relative rung (``"90%"`` -> 90.0); the rung was validated at load."""
    return float(rung.rstrip("%"))


@dataclass(frozen=True, slots=True)
class ThermalPolicy:
    """Zone thresholds in degrees Celsius; a zone is entered at >= its threshold
    and left only once the temperature is below threshold - hysteresis_c."""

    warning_c: float = 70.0
    hot_c: float = 80.0
    throttle_c: float = 85.0
    critical_c: float = 95.0
    hysteresis_c: float = 3.0


@dataclass(frozen=True, slots=True)
class PowerPolicy:
    """The power ladder: rungs highest first, and when to move on it.

    A rung is watts (a float) or a percentage of the card's own default power limit
    (a string such as ``"90%"``, the default as NVML reports it); one ladder is all
    watts or all percentages. Rungs are resolved per GPU and clamped to its allowed
    range (:func:`governor.rules.power.effective_ladder`): the built-in
    ``("100%", "90%")`` gives an RTX 4070 (200 W default) 200 -> 180 W and an H100
    (700 W) 700 -> 630 W. An absolute ladder whose top rung is under
    :data:`governor.config.DEEP_CAP_RATIO` of a card's default limit is refused for
    that card unless ``allow_deep_cap`` is true (:func:`governor.config.check_resolved`):
    a deep cap is never applied by accident.

    One rung down after ``debounce_samples`` consecutive readings >=
    ``step_down_at_c``; one rung up after the temperature stayed <= ``step_up_at_c``
    for ``dwell_s`` seconds; at most one change per ``min_change_interval_s``
    seconds, except that entering the critical zone drops straight to the floor.

    Anti-flap backoff (lazy when releasing): a step down within ``flap_window_s`` seconds
    of the last step up doubles the dwell before the next step up, and doubles it again
    until it is longer than that release lasted (step up to step down), up to ``dwell_max_s``
    (never below ``dwell_s``); every ``backoff_decay_s`` seconds without a limit change
    halves it again, back to ``dwell_s``. ``flap_window_s = 0`` turns the backoff off.

    Target mode (``mode = "target"``, :mod:`governor.rules.target`) replaces the ladder with
    a continuous limit between ``floor_w`` (watts or a percentage of the default limit;
    None: the card's minimum) and the card's default limit, chosen from a thermal model
    fitted online so the die settles ``deadband_c / 2`` below ``target_c``; it lowers when
    the model predicts ``target_c`` within ``horizon_s`` seconds, raises only after
    ``dwell_s`` seconds of a binding limit the model says is more than ``deadband_c`` too
    low, and makes at most ``max_changes_per_hour`` changes in any hour except to lower
    (never held back) and the critical jump. ``min_change_interval_s`` applies to both modes.
    """

    ladder_w: tuple[Rung, ...] = ("100%", "90%")
    step_down_at_c: float = 75.0
    step_up_at_c: float = 65.0
    debounce_samples: int = 3
    dwell_s: float = 60.0
    min_change_interval_s: float = 30.0
    enabled: bool = True
    flap_window_s: float = 900.0
    dwell_max_s: float = 1800.0
    backoff_decay_s: float = 3600.0
    allow_deep_cap: bool = False
    # Target mode (governor.rules.target): keep the die at or below target_c with a continuous limit.
    mode: str = "ladder"
    target_c: float = 75.0
    floor_w: Rung | None = None
    deadband_c: float = 3.0
    horizon_s: float = 120.0
    max_changes_per_hour: int = 4
    # The node budget (NodePolicy): this GPU's share weight.
    budget_weight: float = 1.0

    @property
    def target_mode(self) -> bool:
        """True when this GPU holds a temperature (``mode = "target"``) rather than climbing a ladder."""
        return self.mode == "target"


@dataclass(frozen=True, slots=True)
class NodePolicy:
    """A power budget shared by every GPU of the node (a PSU or a circuit), in watts.

    ``power_budget_w`` None: no budget. The sum of the limits the governor sets never
    exceeds it; shares go by demand and each GPU's ``power.budget_weight`` (``share =
    "demand"``) or by weight alone (``share = "weight"``: a static split), and move at most
    once per ``rebalance_interval_s`` seconds (a lowering that the budget needs at once,
    such as at start, is never held back). See :mod:`governor.rules.budget`.
    """

    power_budget_w: float | None = None
    rebalance_interval_s: float = 60.0
    share: str = "demand"
    min_share_change_w: float = 5.0


class FanMode(StrEnum):
    """Who drives a GPU's fans."""

    AUTO = "auto"  # the card's own control, never touched
    CURVE = "curve"  # the governor, from a temperature -> percent curve
    ASSIST = "assist"  # the card until the power rule would step down; then the governor raises the fans first


@dataclass(frozen=True, slots=True)
class FanPolicy:
    """Fan control (``[fan]``); percentages are of the fan's maximum speed (NVML's unit).

    ``mode`` auto leaves the fans to the card. ``curve`` sets every fan in ``fans`` (empty:
    all) to the speed the ``curve`` points give for the temperature (linear between
    points, flat beyond the ends); it lowers a fan only once the temperature is
    ``hysteresis_c`` below the point that would give the lower speed. ``assist`` is the
    power rule's partner: at or above ``raise_at_c`` the governor takes the fans over and
    raises them by ``step_percent`` every ``step_interval_s`` toward ``max_percent``; the
    power ladder's step down waits while the fans can still rise, and for ``settle_s``
    after they reached the ceiling (the heatsink needs that long to cool); at or below
    ``lower_at_c`` the fans come down step by step and go back to the card's automatic
    control once they reach the speed they were taken over at.

    ``max_percent`` is the noise ceiling in every mode; every target is also clamped to the
    card's own range. A fan whose measured speed stays more than
    ``follow_tolerance_percent`` away from its target for ``follow_timeout_s`` is handed
    back to the card and the GPU's fans are left alone from then on.
    """

    mode: FanMode = FanMode.AUTO
    max_percent: float = 75.0
    fans: tuple[int, ...] = ()
    curve: tuple[tuple[float, float], ...] = ((50.0, 30.0), (70.0, 50.0), (80.0, 75.0))
    hysteresis_c: float = 3.0
    raise_at_c: float = 70.0
    lower_at_c: float = 62.0
    step_percent: float = 10.0
    step_interval_s: float = 5.0
    settle_s: float = 60.0
    follow_tolerance_percent: float = 10.0
    follow_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.mode, FanMode):  # a caller that passes "assist" still gets the enum
            object.__setattr__(self, "mode", FanMode(self.mode))


@dataclass(frozen=True, slots=True)
class GpuPolicy:
    """The thermal, power and fan policy in force for one GPU."""

    thermal: ThermalPolicy = field(default_factory=ThermalPolicy)
    power: PowerPolicy = field(default_factory=PowerPolicy)
    fan: FanPolicy = field(default_factory=FanPolicy)


# --------------------------------------------------------------------------- VRAM and classes

BINARY_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
"""The units sizes are printed in (largest first when rendering)."""
MESSAGE_VALUE_CHARS = 60
"""Values quoted in config errors and warnings are cut to this many characters."""
MATCH_KEYS = ("name", "exe", "cmdline", "user", "unit", "slice", "cgroup")
UNTRUSTED_KEYS = ("name", "cmdline")
"""Match keys whose value the process itself chooses (comm name, command line)."""
DEFAULT_PROTECTED_NAMES = (
    "Xorg",
    "Xwayland",
    "X",
    "gnome-shell",
    "kwin_wayland",
    "kwin_x11",
    "mutter",
    "sway",
    "weston",
    "Hyprland",
    "gamescope",
    "gdm-x-session",
    "sddm",
    "nvidia-persistenced",
)
"""Display servers, compositors and NVIDIA's own daemon: never signalled.

Matched against the basename of the executable the kernel reports (/proc/PID/exe),
never the comm name, and only for a root-owned system binary (see
:func:`governor.processes.protection`)."""


def format_size(size_bytes: int) -> str:
    """A byte count for people (logs, reports): ``6GiB`` when exact, else two decimals (``7.30GiB``)."""
    for unit, scale in reversed(BINARY_UNITS.items()):
        if size_bytes >= scale:
            if size_bytes % scale == 0:
                return f"{size_bytes // scale}{unit}"
            return f"{size_bytes / scale:.2f}{unit}"
    return f"{size_bytes}B"


def clip(text: str) -> str:
    """``text`` cut to ``MESSAGE_VALUE_CHARS`` characters (with "...") for a message."""
    return text if len(text) <= MESSAGE_VALUE_CHARS else text[: MESSAGE_VALUE_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class ProcessMatch:
    """Match rules of a class; every given key must match (AND)."""

    name: str | None = None  # glob on the process name (comm): untrusted
    exe: str | None = None  # glob on the executable path (/proc/PID/exe)
    cmdline: regex.Pattern[str] | None = None  # regex searched in the command line: untrusted
    user: str | None = None  # user name or numeric uid
    unit: str | None = None  # glob on the systemd unit (from /proc/PID/cgroup)
    slice: str | None = None  # glob on any systemd slice in the cgroup path
    cgroup: regex.Pattern[str] | None = None  # regex searched in the cgroup path (containers)
    user_units: bool = False  # unit/slice/cgroup also see a user manager's own units

    def is_empty(self) -> bool:
        """True when no match key is given (the class can never match)."""
        return all(getattr(self, k) is None for k in MATCH_KEYS)

    def untrusted_only(self) -> bool:
        """True when every given key is one the process chooses itself (name, cmdline)."""
        return not self.is_empty() and all(getattr(self, k) is None for k in MATCH_KEYS if k not in UNTRUSTED_KEYS)

    def describe(self) -> str:
        """The match rules as text (long values cut)."""
        parts = []
        for key in MATCH_KEYS:
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={clip(repr(value) if isinstance(value, str) else value.pattern)}")
        if self.user_units:
            parts.append("user_units")
        return " and ".join(parts) or "nothing"


@dataclass(frozen=True, slots=True)
class ProcessClass:
    """A named class of processes with its budget (bytes per process per GPU) and enforcement.

    ``grace_s`` is how long a process may stay over budget before ``action``;
    ``kill_after_s`` how long after SIGTERM a process still over gets SIGKILL.

    ``stop-unit`` stops the process's systemd system unit (under memory pressure even when
    within budget: the unit makes room). With ``resume`` it is started again once the
    condition stayed clear for ``resume_after_s`` and its budget fits above the reserve; a
    unit stopped again within ``flap_window_s`` of its resume waits twice as long next time,
    up to ``resume_after_max_s``. For signalling classes, a unit whose processes were
    signalled ``restart_loop_count`` times within ``restart_loop_window_s`` and that is over
    budget again is in a kill-restart loop: reported, and signalled no more.
    """

    name: str
    match: ProcessMatch = field(default_factory=ProcessMatch)
    budget_bytes: int | None = None  # None: no budget (observe only)
    priority: int = 0
    action: ProcessAction = ProcessAction.OBSERVE
    grace_s: float = 30.0
    kill_after_s: float = 10.0
    dry_run: bool = False
    protected: bool = False
    resume: bool = False  # stop-unit: start the unit again once the condition stayed clear
    resume_after_s: float = 60.0  # stop-unit: seconds clear before the unit is started again
    resume_after_max_s: float = 3600.0  # stop-unit: the longest the backed-off resume delay grows
    flap_window_s: float = 900.0  # stop-unit: stopped again this soon after a resume doubles the delay
    restart_loop_count: int = 3  # signals: a unit signalled this many times ...
    restart_loop_window_s: float = 600.0  # ... within this many seconds and over budget again is a loop

    def __post_init__(self) -> None:
        # A caller that passes the action's name ("terminate") still gets the enum.
        if not isinstance(self.action, ProcessAction):
            object.__setattr__(self, "action", ProcessAction(self.action))

    @property
    def enforced_action(self) -> ProcessAction:
        """The action really taken: ``observe`` when a signalling (or unit-stopping) class matches
        only on untrusted keys."""
        if self.action in ACTING_ACTIONS and self.match.untrusted_only():
            return ProcessAction.OBSERVE
        return self.action


DEFAULT_CLASS = ProcessClass(name="unclassified", priority=0, action=ProcessAction.OBSERVE)


@dataclass(frozen=True, slots=True)
class VramPolicy:
    """Per-GPU free reserve (bytes), memory pressure (used ratio 0..1), cooldown (s),
    protection and the classes."""

    enabled: bool = True
    reserve_bytes: int = 0
    pressure_used_ratio: float = 0.90
    cooldown_s: float = 30.0
    dry_run: bool = False
    per_process_metrics: bool = False
    protected_names: tuple[str, ...] = DEFAULT_PROTECTED_NAMES
    classes: tuple[ProcessClass, ...] = ()
    default_class: ProcessClass = DEFAULT_CLASS
    # Advice found while parsing (decimal size units), for check-config; not a config key.
    notes: tuple[str, ...] = field(default=(), metadata={"config": False})

    def class_named(self, name: str) -> ProcessClass:
        """The class called ``name`` (the default class when unknown)."""
        for klass in self.classes:
            if klass.name == name:
                return klass
        return self.default_class


# --------------------------------------------------------------------------- systemd units

DENIED_UNITS: tuple[str, ...] = (
    "gpu-governor.service",
    "init.scope",
    "-.slice",
    "*.slice",
    "systemd-*",
    "dbus*",
    "polkit.service",
    "ssh.service",
    "sshd.service",
    "ssh@*.service",
    "sshd@*.service",
    "getty@*.service",
    "serial-getty@*.service",
    "console-getty.service",
    "container-getty@*.service",
    "autovt@*.service",
    "display-manager.service",
    "gdm.service",
    "gdm3.service",
    "sddm.service",
    "lightdm.service",
    "lxdm.service",
    "xdm.service",
    "greetd.service",
    "nodm.service",
    "user@*.service",
    "user-runtime-dir@*.service",
    "nvidia-persistenced.service",
)
"""Units the governor never touches (globs): itself, PID 1, slices, systemd's own units, D-Bus,
polkit, sshd, gettys, display managers, user managers, NVIDIA's daemon. A process in one of
them is never signalled and its unit never stopped; a class whose ``unit`` match could name
one of them and that acts (terminate, kill, stop-unit) is a config error."""
SESSION_UNITS: tuple[str, ...] = ("session-*.scope", "user@*.service", "user-*.slice", "user.slice")
"""What user sessions are made of: their processes are observed and reported, their units never
stopped (a ``stop-unit`` class whose ``unit`` or ``slice`` names one is a config error)."""


def _sample(pattern: str) -> str:
    """A name the glob ``pattern`` matches (its wildcards filled in)."""
    return pattern.replace("*", "x").replace("?", "x")


def denied_by(glob: str, denied: tuple[str, ...] = DENIED_UNITS) -> str | None:
    """The entry of ``denied`` that the match glob ``glob`` could name, or None.

    Both ways: the glob matches an example of the entry (``*.service`` matches
    ``sshd.service``), or the glob's text falls under the entry (``systemd-foo*``).
    """
    for entry in denied:
        if fnmatch.fnmatchcase(_sample(entry), glob) or fnmatch.fnmatchcase(glob, entry):
            return entry
    return None


def denied_unit(unit: str | None) -> str | None:
    """The deny-list entry ``unit`` falls under, or None (also for no unit)."""
    if unit is None:
        return None
    for entry in DENIED_UNITS:
        if fnmatch.fnmatchcase(unit, entry):
            return entry
    return None


def session_unit(slices: tuple[str, ...]) -> bool:
    """True for a process of a user session (its cgroup is under ``user.slice``)."""
    return "user.slice" in slices
