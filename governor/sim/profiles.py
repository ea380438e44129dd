"""GPU profiles: the static facts and thermal constants of one simulated GPU model.

A profile is a TOML file; the shipped ones live in ``governor/data/profiles`` and are
loaded by name (``rtx4070``, ``h100-80gb``), any other by path. The format is
documented in docs/simulation.md and is what :func:`render_profile` writes, so a
calibration can produce a profile that loads back unchanged.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from governor.model import MAX_PLAUSIBLE_W
from governor.schema import MAX_BYTES, ConfigIssue, Issues, Key, Table, finite_number
from governor.sim._schema import SimDataError, issues_in, read_toml
from governor.sim.thermal import ThermalParams


@dataclass(frozen=True, slots=True)
class SimTelemetry:
    """What the simulated GPU reports beside power and temperature (a profile's optional
    ``[telemetry]`` table): SM clock at full speed and at idle, memory clock busy and idle
    (MHz), the performance state at idle (busy is P0), the number of fans (0: none, as on
    a data-center board: fan speed NotSupported), and whether the board reports ECC
    counts and remapped rows (``ecc``) and a memory temperature (``memory_temperature``).
    """

    sm_clock_max_mhz: float = 1800.0
    sm_clock_idle_mhz: float = 300.0
    memory_clock_mhz: float = 5000.0
    memory_clock_idle_mhz: float = 5000.0
    idle_pstate: int = 8
    fans: int = 0
    ecc: bool = False
    memory_temperature: bool = False


@dataclass(frozen=True, slots=True)
class SimFan:
    """The fan model of a profile's optional ``[fan]`` table (docs/simulation.md, "Fans").

    Percentages are of the fan's maximum speed. Under the card's automatic control the
    heatsink keeps the profile's calibrated ``r_sink_c_per_w`` and the fans report
    ``auto_curve`` (points [die temperature C, percent], linear between, flat beyond).
    A speed set by hand (clamped to ``min_percent``-``max_percent``) changes the heatsink
    resistance to ``r_sink * (reference_percent / speed) ** airflow_exponent``:
    ``reference_percent`` is the speed the card's own control runs at in the conditions
    the thermal constants describe. A set speed is reached with the time constant
    ``response_s`` (seconds).
    """

    min_percent: float = 30.0
    max_percent: float = 100.0
    reference_percent: float = 50.0
    airflow_exponent: float = 0.8
    response_s: float = 3.0
    auto_curve: tuple[tuple[float, float], ...] = (
        (40.0, 30.0),
        (60.0, 45.0),
        (70.0, 50.0),
        (87.0, 55.0),
        (90.0, 100.0),
    )

    def auto_percent(self, die_c: float) -> float:
        """The speed the card's own control runs the fans at, at ``die_c``."""
        curve = self.auto_curve
        if die_c <= curve[0][0]:
            return curve[0][1]
        for (lo_c, lo_p), (hi_c, hi_p) in itertools.pairwise(curve):
            if die_c <= hi_c:
                return lo_p + (hi_p - lo_p) * (die_c - lo_c) / (hi_c - lo_c)
        return curve[-1][1]

    def r_sink_c_per_w(self, r_sink_c_per_w: float, speed_percent: float) -> float:
        """The heatsink resistance (C/W) at a hand-set ``speed_percent`` (see the class docstring)."""
        speed = max(speed_percent, 1.0)
        return float(r_sink_c_per_w * (self.reference_percent / speed) ** self.airflow_exponent)


@dataclass(frozen=True, slots=True)
class GpuProfile:
    """One GPU model as the simulator plays it.

    Powers in watts, temperatures in C, memory in bytes. ``ambient_c`` is the room
    temperature the thermal constants were fitted or chosen for; a scenario or the
    config may set another. ``memory_reserved_bytes`` is what the driver holds with no
    process running (counted in ``memory_used_bytes``, like NVML's v1 memory info).
    """

    name: str
    gpu_name: str
    memory_total_bytes: int
    memory_reserved_bytes: int
    idle_power_w: float
    power_limit_min_w: float
    power_limit_max_w: float
    power_limit_default_w: float
    temperature_slowdown_c: float
    temperature_shutdown_c: float
    thermal: ThermalParams
    ambient_c: float
    source: str = "<built-in>"
    telemetry: SimTelemetry = SimTelemetry()
    fan: SimFan | None = None  # None: fans NVML cannot set (or none)


def is_path(name_or_path: str) -> bool:
    """Whether a profile or scenario reference is a file path rather than a shipped name."""
    return "/" in name_or_path or "\\" in name_or_path or name_or_path.endswith(".toml")


def shipped_names(kind: str) -> list[str]:
    """Names of the data files shipped in ``governor/data/<kind>`` (``profiles``, ``scenarios``)."""
    folder = resources.files("governor").joinpath("data").joinpath(kind)
    if not folder.is_dir():
        return []
    return sorted(entry.name[: -len(".toml")] for entry in folder.iterdir() if entry.name.endswith(".toml"))


def resolve(name_or_path: str, kind: str, key: str) -> Path:
    """The file a profile or scenario reference points at; SimDataError when there is none.

    ``kind`` is ``profiles`` or ``scenarios``; ``key`` the config key that named it,
    for the error message.
    """
    if is_path(name_or_path):
        return Path(name_or_path)
    entry = resources.files("governor").joinpath("data").joinpath(kind).joinpath(f"{name_or_path}.toml")
    if not entry.is_file():
        names = ", ".join(repr(n) for n in shipped_names(kind))
        raise SimDataError(
            [ConfigIssue(f"<shipped {kind}>", key, f"one of {names}, or a path to a .toml file", repr(name_or_path))]
        )
    return Path(str(entry))


# Plausible thermal constants: far wider than any GPU's (an H100's resistances are about 0.03 C/W,
# its capacities 10-700 J/C), narrow enough that the simulator's arithmetic stays finite.
R_RANGE_C_PER_W = (1e-5, 10.0)
C_RANGE_J_PER_C = (1e-3, 1e7)
TAU_RANGE_S = (1e-3, 1e6)
AMBIENT_RANGE_C = (-20.0, 60.0)
"""The room temperatures (C) a profile or scenario may give."""


def _thermal(table: Table, issues: Issues) -> tuple[ThermalParams | None, float | None]:
    r_lo, r_hi = R_RANGE_C_PER_W
    r_die = table.number("r_die_c_per_w", "a thermal resistance in C/W", lo=r_lo, hi=r_hi)
    r_sink = table.number("r_sink_c_per_w", "a thermal resistance in C/W", lo=r_lo, hi=r_hi)
    capacities: dict[str, float | None] = {}
    for node, r in (("die", r_die), ("sink", r_sink)):
        c_key, tau_key = f"c_{node}_j_per_c", f"tau_{node}_s"
        has_c, has_tau = table.has(c_key), table.has(tau_key)
        if has_c == has_tau:
            issues.add(
                table.key(c_key),
                f"exactly one of {c_key} (J/C) or {tau_key} (s)",
                "both" if has_c else "neither",
            )
            capacities[node] = None
        elif has_c:
            capacities[node] = table.number(
                c_key, "a heat capacity in J/C", lo=C_RANGE_J_PER_C[0], hi=C_RANGE_J_PER_C[1]
            )
        else:
            tau = table.number(tau_key, "a time constant in seconds", lo=TAU_RANGE_S[0], hi=TAU_RANGE_S[1])
            capacities[node] = None if tau is None or r is None else tau / r
    ambient = table.number("ambient_c", "a room temperature in C", lo=AMBIENT_RANGE_C[0], hi=AMBIENT_RANGE_C[1])
    c_die, c_sink = capacities["die"], capacities["sink"]
    if r_die is None or r_sink is None or c_die is None or c_sink is None:
        return None, ambient
    return ThermalParams(r_die, c_die, r_sink, c_sink), ambient


def _telemetry(table: Table) -> SimTelemetry:
    """The ``[telemetry]`` table; a key left out keeps SimTelemetry's default."""
    d = SimTelemetry()
    mhz = "a clock in MHz"
    sm_max = table.number("sm_clock_max_mhz", mhz, lo=1.0, hi=10000.0, default=d.sm_clock_max_mhz)
    sm_idle = table.number("sm_clock_idle_mhz", mhz, lo=1.0, hi=10000.0, default=d.sm_clock_idle_mhz)
    mem = table.number("memory_clock_mhz", mhz, lo=1.0, hi=50000.0, default=d.memory_clock_mhz)
    mem_idle = table.number("memory_clock_idle_mhz", mhz, lo=1.0, hi=50000.0, default=mem)
    pstate = table.integer("idle_pstate", "a performance state 0-15", required=False)
    fans = table.integer("fans", "a number of fans, 0-8", required=False)
    ecc = table.boolean("ecc", "whether ECC counts and remapped rows are reported", default=d.ecc)
    memory_temp = table.boolean("memory_temperature", "whether a memory temperature is reported", default=False)
    if pstate is not None and pstate > 15:
        table.issues.add(table.key("idle_pstate"), "a performance state 0-15", str(pstate))
    if fans is not None and fans > 8:
        table.issues.add(table.key("fans"), "a number of fans, 0-8", str(fans))
    if sm_max is not None and sm_idle is not None and sm_idle > sm_max:
        table.issues.add(table.key("sm_clock_idle_mhz"), f"a clock at most sm_clock_max_mhz {sm_max:g}", f"{sm_idle:g}")
    table.finish()
    return SimTelemetry(
        sm_clock_max_mhz=d.sm_clock_max_mhz if sm_max is None else sm_max,
        sm_clock_idle_mhz=d.sm_clock_idle_mhz if sm_idle is None else sm_idle,
        memory_clock_mhz=d.memory_clock_mhz if mem is None else mem,
        memory_clock_idle_mhz=(d.memory_clock_mhz if mem is None else mem) if mem_idle is None else mem_idle,
        idle_pstate=d.idle_pstate if pstate is None else pstate,
        fans=d.fans if fans is None else fans,
        ecc=ecc,
        memory_temperature=memory_temp,
    )


def _fan(table: Table) -> SimFan | None:
    """The ``[fan]`` table; a key left out keeps SimFan's default."""
    d = SimFan()
    pct = "a percentage of the fan's maximum speed, 0-100"
    low = table.number("min_percent", pct, lo=0.0, hi=100.0, default=d.min_percent)
    high = table.number("max_percent", pct, lo=0.0, hi=100.0, default=d.max_percent)
    ref = table.number("reference_percent", pct, lo=1.0, hi=100.0, default=d.reference_percent)
    exponent = table.number("airflow_exponent", "an exponent, 0-2", lo=0.0, hi=2.0, default=d.airflow_exponent)
    response = table.number("response_s", "a time constant in seconds", lo=0.0, hi=60.0, default=d.response_s)
    raw = table.get("auto_curve", _AUTO_CURVE, required=False)
    table.finish()
    if low is not None and high is not None and low > high:
        table.issues.add(table.key("min_percent"), f"a speed at most max_percent {high:g}", f"{low:g}")
        return None
    if None in (low, high, ref, exponent, response):
        return None
    assert low is not None and high is not None and ref is not None and exponent is not None and response is not None
    curve = d.auto_curve if raw is None else tuple(raw)
    return SimFan(low, high, ref, exponent, response, curve)


def _point(item: Any) -> tuple[float, float] | None:
    ok = isinstance(item, list) and len(item) == 2 and all(finite_number(x) for x in item)
    return (float(item[0]), float(item[1])) if ok and 0.0 <= item[1] <= 100.0 else None


def _rising(v: Any) -> str | None:
    if not v or any(b[0] <= a[0] or b[1] < a[1] for a, b in itertools.pairwise(v)):
        return "points in rising temperature order whose speeds never fall"
    return None


_AUTO_CURVE = Key(
    "array", "[die temperature C, percent] points", _rising, item=_point, item_expected="[temperature C, percent 0-100]"
)


def parse_profile(data: dict[str, object], source: str) -> GpuProfile:
    """Validate a parsed profile document; SimDataError lists every problem."""
    issues = issues_in(source)
    top = Table(dict(data), "", issues)
    name = top.string("name", "a profile name")
    gpu_name = top.string("gpu_name", "the GPU's marketing name as NVML reports it")
    total = top.integer("memory_total_bytes", "bytes of VRAM", lo=1, hi=MAX_BYTES)
    reserved = top.integer("memory_reserved_bytes", "bytes the driver holds with no process", lo=0, hi=MAX_BYTES)
    idle = top.number("idle_power_w", "watts drawn with no work", lo=0.0, hi=MAX_PLAUSIBLE_W)
    limits = top.table("power_limit")
    lo_w = hi_w = default_w = None
    if limits is not None:
        lo_w = limits.number("min_w", "watts", lo=0.0, hi=MAX_PLAUSIBLE_W, above=True)
        hi_w = limits.number("max_w", "watts", lo=0.0, hi=MAX_PLAUSIBLE_W, above=True)
        default_w = limits.number("default_w", "watts", lo=0.0, hi=MAX_PLAUSIBLE_W, above=True)
        limits.finish()
        if lo_w is not None and hi_w is not None and default_w is not None and not lo_w <= default_w <= hi_w:
            issues.add(
                limits.key("default_w"),
                f"a limit between min_w {lo_w:g} and max_w {hi_w:g}",
                f"{default_w:g}",
            )
    temps = top.table("temperature")
    slowdown = shutdown = None
    if temps is not None:
        slowdown = temps.number("slowdown_c", "a temperature in C", lo=30.0, hi=150.0)
        shutdown = temps.number("shutdown_c", "a temperature in C", lo=30.0, hi=150.0)
        temps.finish()
        if slowdown is not None and shutdown is not None and shutdown <= slowdown:
            issues.add(temps.key("shutdown_c"), f"a temperature above slowdown_c {slowdown:g}", f"{shutdown:g}")
    thermal_table = top.table("thermal")
    params, ambient = _thermal(thermal_table, issues) if thermal_table is not None else (None, None)
    if thermal_table is not None:
        thermal_table.finish()
    telemetry_table = top.table("telemetry", required=False)
    telemetry = _telemetry(telemetry_table) if telemetry_table is not None else SimTelemetry()
    fan_table = top.table("fan", required=False)
    fan = _fan(fan_table) if fan_table is not None else None
    top.finish()
    if fan is not None and telemetry.fans == 0:
        issues.add("fan", "no [fan] table on a board without fans (telemetry.fans = 0)", "a [fan] table")
    if total is not None and reserved is not None and reserved >= total:
        issues.add("memory_reserved_bytes", f"fewer bytes than memory_total_bytes {total}", str(reserved))
    if idle is not None and lo_w is not None and idle >= lo_w:
        issues.add("idle_power_w", f"less than power_limit.min_w {lo_w:g}", f"{idle:g}")
    issues.raise_if_any()
    assert name is not None and gpu_name is not None and total is not None and reserved is not None
    assert idle is not None and lo_w is not None and hi_w is not None and default_w is not None
    assert slowdown is not None and shutdown is not None and params is not None and ambient is not None
    return GpuProfile(
        name=name,
        gpu_name=gpu_name,
        memory_total_bytes=total,
        memory_reserved_bytes=reserved,
        idle_power_w=idle,
        power_limit_min_w=lo_w,
        power_limit_max_w=hi_w,
        power_limit_default_w=default_w,
        temperature_slowdown_c=slowdown,
        temperature_shutdown_c=shutdown,
        thermal=params,
        ambient_c=ambient,
        source=source,
        telemetry=telemetry,
        fan=fan,
    )


def load_profile(name_or_path: str) -> GpuProfile:
    """A shipped profile by name (``rtx4070``) or any profile TOML by path."""
    path = resolve(name_or_path, "profiles", "simulation.profile")
    return parse_profile(read_toml(path), str(path))


def _num(value: float) -> str:
    return repr(float(value))


def render_profile(profile: GpuProfile, comment: str = "") -> str:
    """The profile as TOML that :func:`load_profile` reads back unchanged; ``comment``
    lines (for instance where the thermal constants came from) go at the top."""
    lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
    t = profile.thermal
    tel = profile.telemetry
    lines += [
        f"name = {json.dumps(profile.name)}",
        f"gpu_name = {json.dumps(profile.gpu_name)}",
        f"memory_total_bytes = {profile.memory_total_bytes}",
        f"memory_reserved_bytes = {profile.memory_reserved_bytes}",
        f"idle_power_w = {_num(profile.idle_power_w)}",
        "",
        "[power_limit]",
        f"min_w = {_num(profile.power_limit_min_w)}",
        f"max_w = {_num(profile.power_limit_max_w)}",
        f"default_w = {_num(profile.power_limit_default_w)}",
        "",
        "[temperature]",
        f"slowdown_c = {_num(profile.temperature_slowdown_c)}",
        f"shutdown_c = {_num(profile.temperature_shutdown_c)}",
        "",
        "[thermal]",
        f"r_die_c_per_w = {_num(t.r_die_c_per_w)}",
        f"c_die_j_per_c = {_num(t.c_die_j_per_c)}",
        f"r_sink_c_per_w = {_num(t.r_sink_c_per_w)}",
        f"c_sink_j_per_c = {_num(t.c_sink_j_per_c)}",
        f"ambient_c = {_num(profile.ambient_c)}",
        "",
        "[telemetry]",
        f"sm_clock_max_mhz = {_num(tel.sm_clock_max_mhz)}",
        f"sm_clock_idle_mhz = {_num(tel.sm_clock_idle_mhz)}",
        f"memory_clock_mhz = {_num(tel.memory_clock_mhz)}",
        f"memory_clock_idle_mhz = {_num(tel.memory_clock_idle_mhz)}",
        f"idle_pstate = {tel.idle_pstate}",
        f"fans = {tel.fans}",
        f"ecc = {'true' if tel.ecc else 'false'}",
        f"memory_temperature = {'true' if tel.memory_temperature else 'false'}",
    ]
    fan = profile.fan
    if fan is not None:
        curve = ", ".join(f"[{_num(c)}, {_num(p)}]" for c, p in fan.auto_curve)
        lines += [
            "",
            "[fan]",
            f"min_percent = {_num(fan.min_percent)}",
            f"max_percent = {_num(fan.max_percent)}",
            f"reference_percent = {_num(fan.reference_percent)}",
            f"airflow_exponent = {_num(fan.airflow_exponent)}",
            f"response_s = {_num(fan.response_s)}",
            f"auto_curve = [{curve}]",
        ]
    return "\n".join(lines) + "\n"
