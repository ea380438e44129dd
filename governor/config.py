"""Configuration: a TOML file validated into frozen dataclasses.

Every problem in a file is collected and reported at once; each names the file,
the key path (``power.ladder_w[1]``), what was expected and what was found.
Unknown keys get a did-you-mean. A file that fails validation never replaces a
running configuration: :func:`load_config` either returns a whole
:class:`Config` or raises :class:`ConfigError`.
"""

from __future__ import annotations

# ruff: noqa: PLC0414 - "import X as X" marks a re-export (names that moved to governor.policy/schema)
import errno
import fnmatch
import ipaddress
import os
import ssl
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

import itertools

from governor.classes import parse_vram
from governor.errors import MAX_SHOWN_ISSUES as MAX_SHOWN_ISSUES
from governor.errors import ConfigError as ConfigError
from governor.errors import ConfigIssue as ConfigIssue
from governor.model import GpuInfo

# Policy types live in governor.policy and the schema engine in governor.schema; the names
# stay importable from here (re-exports) for the code that found them here before.
from governor.policy import FanMode as FanMode
from governor.policy import FanPolicy as FanPolicy
from governor.policy import GpuPolicy as GpuPolicy
from governor.policy import NodePolicy as NodePolicy
from governor.policy import PowerPolicy as PowerPolicy
from governor.policy import Rung as Rung
from governor.policy import ThermalPolicy as ThermalPolicy
from governor.policy import VramPolicy as VramPolicy
from governor.policy import percent_of as percent_of
from governor.safefile import root_trust_problems, untrusted_ancestor
from governor.schema import (
    Issues,
    between,
    config_text,
    convert,
    describe,
    finite_number,
    kernel_path,
    one_of,
    section,
    short,
    table_of,
    unknown,
)
from governor.schema import Key as Key
from governor.schema import Validator as Validator

DEFAULT_CONFIG_PATH = Path("/etc/gpu-governor/governor.toml")
DEFAULT_METRICS_PORT = 9847
"""Default metrics port.

Chosen to collide with none of the ports a GPU host already runs: 9100
(node-exporter), 9400 (dcgm-exporter), 9835 (nvidia_gpu_exporter), 8000
(nvitop-exporter), nor 9090/9093 (Prometheus, Alertmanager).
"""

MAX_CONFIG_BYTES = 1024 * 1024
"""A governor config is a few kilobytes; anything over 1 MiB is refused unread."""

DEEP_CAP_RATIO = 0.75
"""An absolute top rung under this fraction of a card's default limit is a deep cap (refused
unless ``power.allow_deep_cap``)."""


@dataclass(frozen=True, slots=True)
class GpuOverride:
    """Per-GPU policy changes, applied to every GPU the match selects.

    A GPU is selected when every given selector matches: ``index``, ``uuid``
    (exact, case-insensitive) and ``name`` (a case-insensitive glob such as
    ``"*H100*"``). Overrides apply in file order; later ones win.
    """

    index: int | None
    uuid: str | None
    name: str | None
    thermal: Mapping[str, Any]
    power: Mapping[str, Any]
    fan: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, gpu: GpuInfo) -> bool:
        """True when this override selects ``gpu``."""
        if self.index is not None and gpu.index != self.index:
            return False
        if self.uuid is not None and gpu.uuid.lower() != self.uuid.lower():
            return False
        return not (self.name is not None and not fnmatch.fnmatchcase(gpu.name.lower(), self.name.lower()))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Where the Prometheus endpoint listens and how it is protected (see docs/security.md).

    A non-loopback ``listen_address`` needs ``allow_remote``. TLS and basic auth come from
    ``web_config_file``, an exporter-toolkit web-config file (governor.webconfig). The keys
    below it are deprecated (one release): TLS is on when both ``tls_cert_file`` and
    ``tls_key_file`` are set; ``tls_client_ca_file`` then requires client certificates
    signed by that CA. Basic auth is on when both ``basic_auth_username`` and
    ``basic_auth_password_hash`` are set. Empty is off.
    """

    enabled: bool = True
    listen_address: str = "127.0.0.1"
    port: int = DEFAULT_METRICS_PORT
    allow_remote: bool = False
    web_config_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    basic_auth_username: str = ""
    basic_auth_password_hash: str = ""

    @property
    def tls(self) -> bool:
        """True when the endpoint serves HTTPS."""
        return bool(self.tls_cert_file and self.tls_key_file)

    @property
    def basic_auth(self) -> bool:
        """True when the endpoint asks for a user name and password."""
        return bool(self.basic_auth_username and self.basic_auth_password_hash)

    @property
    def deprecated_keys(self) -> tuple[str, ...]:
        """The deprecated TLS and basic-auth keys that are set (web_config_file replaces them)."""
        return tuple(f"metrics.{name}" for name in DEPRECATED_METRICS_KEYS if getattr(self, name))


DEPRECATED_METRICS_KEYS = (
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "basic_auth_username",
    "basic_auth_password_hash",
)
"""[metrics] keys replaced by web_config_file: still read for one release, with a warning."""


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log format (auto picks journal under systemd, console on a terminal, else json) and level."""

    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """The simulated backend: which GPUs, which workload, where its hardware state lives."""

    profile: str = "rtx4070"
    gpu_count: int = 1
    scenario: str = "sustained-inference"
    seed: int = 0
    ambient_c: float | None = None
    state_file: str = ""
    time_scale: float = 1.0
    processes_file: str = ""  # real processes (by pid or cgroup) the simulated GPUs report


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration."""

    source: str = "<defaults>"
    poll_interval_s: float = 1.0
    dry_run: bool = False
    backend: str = "nvml"
    state_dir: str = "/var/lib/gpu-governor"
    runtime_dir: str = "/run/gpu-governor"
    wait_for_driver: bool = False
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    thermal: ThermalPolicy = field(default_factory=ThermalPolicy)
    power: PowerPolicy = field(default_factory=PowerPolicy)
    gpus: tuple[GpuOverride, ...] = ()
    vram: VramPolicy = field(default_factory=VramPolicy)
    node: NodePolicy = field(default_factory=NodePolicy)
    fan: FanPolicy = field(default_factory=FanPolicy)

    @property
    def reading_interval_s(self) -> float:
        """The snapshot-time seconds between two polls: ``poll_interval_s``, times the simulation's
        ``time_scale`` on the simulated backend (whose snapshot clock runs that much faster)."""
        if self.backend == "simulated":
            return self.poll_interval_s * self.simulation.time_scale
        return self.poll_interval_s

    def policy_for(self, gpu: GpuInfo) -> GpuPolicy:
        """The thermal, power and fan policy for ``gpu``: defaults, then every matching override."""
        thermal, power, fan = self.thermal, self.power, self.fan
        for override in self.gpus:
            if override.matches(gpu):
                thermal = replace(thermal, **override.thermal)
                power = replace(power, **override.power)
                fan = replace(fan, **override.fan)
        return GpuPolicy(thermal=thermal, power=power, fan=fan)


# --------------------------------------------------------------------------- schema


def _rung(item: Any) -> Rung | None:
    """A ladder item as watts (float) or a normalised percentage ("90%"), None when neither."""
    if finite_number(item):
        return float(item)
    if isinstance(item, str) and 1 < len(item) <= 12 and item.endswith("%"):
        number = item[:-1].strip()
        if number and all(ch.isdigit() or ch == "." for ch in number) and number.count(".") <= 1 and number != ".":
            return f"{float(number):g}%"
    return None


def _ladder(v: Any) -> str | None:
    if not v:
        return "a non-empty list of rungs, highest first"
    relative = [isinstance(x, str) for x in v]
    if any(relative) and not all(relative):
        return "rungs all in watts or all in percent of the card's default limit, not mixed"
    values = [percent_of(x) if isinstance(x, str) else x for x in v]
    if all(relative) and any(not 10.0 <= x <= 100.0 for x in values):
        return "percentages between 10% and 100% of the card's default limit"
    if any(x <= 0 for x in values):
        return "watts greater than 0"
    if any(b >= a for a, b in itertools.pairwise(values)):
        return "a strictly descending list of rungs (highest rung first)"
    return None


def _floor(v: Any) -> str | None:
    """A target-mode floor: watts above 0, or a percentage of the default limit (10% to 100%)."""
    rung = _rung(v)
    if rung is None or not isinstance(v, (str, int, float)):
        return 'watts (a number) or a percentage such as "60%"'
    if isinstance(rung, str):
        return None if 10.0 <= percent_of(rung) <= 100.0 else "a percentage between 10% and 100% of the default limit"
    return None if rung > 0 else "watts greater than 0"


# Plausible ranges: a value outside them is a typo or a torn file (``warning_c = 7`` cut from
# ``70``), never a policy. GPUs slow down at 83-92 C and shut down at 90-100 C; none runs
# below 30 C under load. Documented in the README's config section.
THRESHOLD_RANGE_C = (30.0, 120.0)


def _THRESHOLD(v: Any) -> str | None:
    lo, hi = THRESHOLD_RANGE_C
    if lo <= v <= hi:
        return None
    return f"a temperature between {lo:g} and {hi:g} C (outside that range it is a typo or a torn file)"


def _listen_address(v: Any) -> str | None:
    """An address a socket can bind: at most 253 characters (a DNS name's limit), no NUL,
    control character or space (a NUL made the bind raise TypeError at start)."""
    if len(v) <= 253 and all(ch.isprintable() and not ch.isspace() for ch in v):
        return None
    return "an IP address or host name (at most 253 characters, no spaces or control characters)"


_THRESHOLD_TEXT = f"a temperature in C ({THRESHOLD_RANGE_C[0]:g} to {THRESHOLD_RANGE_C[1]:g})"

THERMAL_KEYS: dict[str, Key] = {
    "warning_c": Key("float", _THRESHOLD_TEXT, _THRESHOLD),
    "hot_c": Key("float", _THRESHOLD_TEXT, _THRESHOLD),
    "throttle_c": Key("float", _THRESHOLD_TEXT, _THRESHOLD),
    "critical_c": Key("float", _THRESHOLD_TEXT, _THRESHOLD),
    "hysteresis_c": Key("float", "degrees C (0 to 30)", between(0.0, 30.0)),
}
POWER_KEYS: dict[str, Key] = {
    "enabled": Key("bool", "true or false"),
    "ladder_w": Key(
        "array",
        'a list of rungs: watts (200.0) or percent of the card\'s default limit ("90%")',
        _ladder,
        item=_rung,
        item_expected='watts (a number) or a percentage such as "90%"',
    ),
    "allow_deep_cap": Key("bool", "true or false (true: an absolute ladder may cap far below a card's default)"),
    "step_down_at_c": Key("float", _THRESHOLD_TEXT, _THRESHOLD),
    "step_up_at_c": Key("float", _THRESHOLD_TEXT, _THRESHOLD),
    "debounce_samples": Key("int", "a whole number of samples", between(1, 3600)),
    "dwell_s": Key("float", "seconds", between(0.0, 86400.0)),
    "min_change_interval_s": Key("float", "seconds", between(0.0, 86400.0)),
    "flap_window_s": Key("float", "seconds (0 turns the backoff off)", between(0.0, 86400.0)),
    "dwell_max_s": Key("float", "seconds", between(0.0, 86400.0)),
    "backoff_decay_s": Key("float", "seconds", between(1.0, 86400.0)),
    "mode": Key("str", "a power mode", one_of("ladder", "target")),
    "target_c": Key("float", _THRESHOLD_TEXT, _THRESHOLD),
    "floor_w": Key(
        "any",
        'watts (120.0) or a percentage of the card\'s default limit ("60%")',
        _floor,
        type_expected='watts (a number) or a percentage such as "60%"',
    ),
    "deadband_c": Key("float", "degrees C (0.5 to 20)", between(0.5, 20.0)),
    "horizon_s": Key("float", "seconds (5 to 3600)", between(5.0, 3600.0)),
    "max_changes_per_hour": Key("int", "a whole number of changes (2 to 3600)", between(2, 3600)),
    "budget_weight": Key("float", "a share weight (0.01 to 100)", between(0.01, 100.0)),
}
NODE_KEYS: dict[str, Key] = {
    "power_budget_w": Key("float", "watts (1 to 1000000)", between(1.0, 1e6)),
    "rebalance_interval_s": Key("float", "seconds (1 to 86400)", between(1.0, 86400.0)),
    "share": Key("str", "how the budget is shared", one_of("demand", "weight")),
    "min_share_change_w": Key("float", "watts (0 to 1000)", between(0.0, 1000.0)),
}


def _curve_point(item: Any) -> tuple[float, float] | None:
    """A fan curve point ``[temperature C, percent]`` as a pair of floats, None when it is not one."""
    if isinstance(item, list) and len(item) == 2 and all(finite_number(x) for x in item):
        temperature, percent = float(item[0]), float(item[1])
        if 0.0 <= temperature <= THRESHOLD_RANGE_C[1] and 0.0 <= percent <= 100.0:
            return temperature, percent
    return None


def _curve(v: Any) -> str | None:
    if not v or len(v) > 16:
        return "1 to 16 points [temperature C, percent]"
    if any(b[0] <= a[0] for a, b in itertools.pairwise(v)):
        return "points in rising temperature order"
    if any(b[1] < a[1] for a, b in itertools.pairwise(v)):
        return "speeds that never fall as the temperature rises"
    return None


def _fan_index(item: Any) -> int | None:
    return item if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < 32 else None


_PERCENT = "percent of the fan's maximum speed (0 to 100)"
FAN_KEYS: dict[str, Key] = {
    "mode": Key("str", "a fan mode", one_of(*(m.value for m in FanMode))),
    "max_percent": Key("float", _PERCENT + ": the noise ceiling", between(0.0, 100.0)),
    "fans": Key(
        "array", "a list of fan indexes (empty: every fan)", None, item=_fan_index, item_expected="a fan index 0-31"
    ),
    "curve": Key(
        "array",
        "a list of [temperature C, percent] points",
        _curve,
        item=_curve_point,
        item_expected=f"a point [temperature C (0 to {THRESHOLD_RANGE_C[1]:g}), percent (0 to 100)]",
    ),
    "hysteresis_c": Key("float", "degrees C (0 to 30)", between(0.0, 30.0)),
    "raise_at_c": Key("float", _THRESHOLD_TEXT, _THRESHOLD),
    "lower_at_c": Key("float", _THRESHOLD_TEXT, _THRESHOLD),
    "step_percent": Key("float", "percent per step (1 to 100)", between(1.0, 100.0)),
    "step_interval_s": Key("float", "seconds", between(0.0, 3600.0)),
    "settle_s": Key("float", "seconds", between(0.0, 3600.0)),
    "follow_tolerance_percent": Key("float", "percent (1 to 100)", between(1.0, 100.0)),
    "follow_timeout_s": Key("float", "seconds (10 to 3600: fan speeds are read every 10 s)", between(10.0, 3600.0)),
}
SCHEMA: dict[str, Key | dict[str, Key]] = {
    "poll_interval_s": Key("float", "seconds", between(0.05, 3600.0)),
    "dry_run": Key("bool", "true or false"),
    "backend": Key("str", "a backend name", one_of("nvml", "simulated")),
    "state_dir": Key("str", "a directory path", kernel_path),
    "runtime_dir": Key("str", "a directory path (empty: write no process table)", kernel_path),
    "wait_for_driver": Key("bool", "true or false"),
    "metrics": {
        "enabled": Key("bool", "true or false"),
        "listen_address": Key("str", "an IP address or host name", _listen_address),
        "port": Key("int", "a TCP port", between(0, 65535)),
        "allow_remote": Key("bool", "true or false"),
        "web_config_file": Key("str", "an exporter-toolkit web-config file (empty: plain HTTP, no auth)", kernel_path),
        "tls_cert_file": Key("str", "a PEM certificate file (empty: plain HTTP)", kernel_path),
        "tls_key_file": Key("str", "a PEM private key file (empty: plain HTTP)", kernel_path),
        "tls_client_ca_file": Key("str", "a PEM CA file for client certificates (empty: none asked)", kernel_path),
        "basic_auth_username": Key("str", "a user name (empty: no basic auth)"),
        "basic_auth_password_hash": Key("str", "a hash from `gpu-governor hash-password` (empty: no basic auth)"),
    },
    "logging": {
        "format": Key("str", "a log format", one_of("auto", "console", "json", "journal")),
        "level": Key("str", "a log level", one_of("debug", "info", "warning", "error")),
    },
    "simulation": {
        "profile": Key("str", "a profile name or a path to a profile TOML", kernel_path),
        "gpu_count": Key("int", "a number of GPUs", between(1, 64)),
        "scenario": Key("str", "a scenario name or a path to a scenario TOML", kernel_path),
        "seed": Key("int", "an integer seed"),
        "ambient_c": Key("float", "a temperature in C", between(-20.0, 60.0)),
        "state_file": Key("str", "a file path (empty: keep state in memory)", kernel_path),
        "time_scale": Key("float", "a speed factor", between(0.01, 10000.0)),
        "processes_file": Key(
            "str", "a JSON file of real processes the simulated GPUs report (empty: none)", kernel_path
        ),
    },
    "thermal": THERMAL_KEYS,
    "power": POWER_KEYS,
    "node": NODE_KEYS,
    "fan": FAN_KEYS,
}
GPU_SELECTORS: dict[str, Key] = {
    "index": Key("int", "a GPU index", between(0, 1023)),
    "uuid": Key("str", "a GPU UUID such as 'GPU-...'"),
    "name": Key("str", "a model name glob such as '*RTX 4070*'"),
}


def _thermal_contradictions(t: ThermalPolicy, prefix: str, out: Issues) -> None:
    order = [
        ("warning_c", t.warning_c),
        ("hot_c", t.hot_c),
        ("throttle_c", t.throttle_c),
        ("critical_c", t.critical_c),
    ]
    for (lo_name, lo), (hi_name, hi) in itertools.pairwise(order):
        if not lo < hi:
            out.add(
                f"{prefix}thermal.{hi_name}",
                f"a temperature above thermal.{lo_name} ({lo:g} C)",
                f"{hi:g}",
            )


def _power_contradictions(p: PowerPolicy, prefix: str, out: Issues) -> None:
    if not p.step_up_at_c < p.step_down_at_c:
        out.add(
            f"{prefix}power.step_up_at_c",
            f"a temperature below power.step_down_at_c ({p.step_down_at_c:g} C)",
            f"{p.step_up_at_c:g}",
        )


def _fan_contradictions(f: FanPolicy, prefix: str, out: Issues) -> None:
    if not f.lower_at_c < f.raise_at_c:
        out.add(
            f"{prefix}fan.lower_at_c",
            f"a temperature below fan.raise_at_c ({f.raise_at_c:g} C)",
            f"{f.lower_at_c:g}",
        )


def check_resolved(config: Config, gpus: Sequence[GpuInfo]) -> list[ConfigIssue]:
    """Contradictions in the policy each GPU actually gets once every matching [[gpu]] applies.

    Each override is checked against the top level at load time; two overrides that both
    match one GPU can still combine into a contradiction (one lowers step_down_at_c, a later
    one raises step_up_at_c). That is only knowable once the GPUs are: the daemon checks it
    at start and before swapping in a reloaded config.
    """
    out = Issues(config.source)
    for gpu in gpus:
        policy = config.policy_for(gpu)
        prefix = f"[[gpu]] overrides for GPU {gpu.index} ({gpu.name}) combined: "
        _thermal_contradictions(policy.thermal, prefix, out)
        _power_contradictions(policy.power, prefix, out)
        _target_contradictions(policy, config.reading_interval_s, prefix, out)
        _fan_contradictions(policy.fan, prefix, out)
        problem = deep_cap_problem(policy.power, gpu)
        if problem is not None:
            out.add(f"power.ladder_w for GPU {gpu.index} ({gpu.name}, {gpu.uuid})", *problem)
    _budget_contradictions(config, gpus, out)
    return out.issues


TARGET_MAX_POLL_S = 5.0
"""The longest poll interval (s) target mode takes: one reading per block of its fit
(:data:`governor.rules.fit.BLOCK_S`), three within its gap limit (``MAX_GAP_S``, 15 s)."""


def _target_contradictions(policy: GpuPolicy, poll_interval_s: float, prefix: str, out: Issues) -> None:
    """Target mode needs its target below the critical zone (which sends the limit to the floor), and
    readings often enough for its thermal model: at most :data:`TARGET_MAX_POLL_S` apart (its fit takes
    a longer interval between two readings for a gap, and starts over at every reading)."""
    from governor.rules.fit import BLOCK_S, MAX_GAP_S

    power, thermal = policy.power, policy.thermal
    if not power.target_mode:
        return
    if not power.target_c < thermal.critical_c:
        out.add(
            f"{prefix}power.target_c",
            f"a temperature below thermal.critical_c ({thermal.critical_c:g} C)",
            f"{power.target_c:g}",
        )
    if poll_interval_s > TARGET_MAX_POLL_S:
        out.add(
            f"{prefix}power.mode",
            f"poll_interval_s (times [simulation] time_scale on the simulator) at most {TARGET_MAX_POLL_S:g} s "
            "with target mode on (its thermal model fits "
            f"the readings of {BLOCK_S:g} s blocks and takes more than {MAX_GAP_S:g} s without one for a gap), "
            'or the ladder (mode = "ladder")',
            f'mode = "target" with readings {poll_interval_s:g} s apart',
        )


def _budget_contradictions(config: Config, gpus: Sequence[GpuInfo], out: Issues) -> None:
    """A node budget below what the cards' minimum limits add up to can never hold."""
    budget = config.node.power_budget_w
    if budget is None or not gpus:
        return
    floors = [g.power_limit_min_w for g in gpus if config.policy_for(g).power.enabled]
    if any(f is None for f in floors):
        return
    total = sum(f for f in floors if f is not None)
    if total > budget:
        out.add(
            "node.power_budget_w",
            f"at least {total:g} W, the sum of the minimum power limits of these {len(floors)} GPU(s)",
            f"{budget:g}",
        )


def deep_cap_problem(power: PowerPolicy, gpu: GpuInfo) -> tuple[str, str] | None:
    """(expected, got) when an absolute ladder's top rung lies under ``DEEP_CAP_RATIO`` of the
    card's default limit (its maximum when NVML gives no default) and ``allow_deep_cap`` is off;
    None when the ladder fits the card.

    The installed ladder of one card family must never silently cap another (an H100 held
    at 200 W by a ladder written for a 200 W card).
    """
    from governor.rules.power import effective_ladder

    default_w = gpu.power_limit_default_w if gpu.power_limit_default_w is not None else gpu.power_limit_max_w
    if not power.enabled or power.allow_deep_cap or power.target_mode or default_w is None or default_w <= 0:
        return None  # target mode uses no ladder: its limit never goes above the default
    if any(isinstance(rung, str) for rung in power.ladder_w):
        return None  # relative rungs follow the card
    ladder = effective_ladder(power.ladder_w, gpu)
    if not ladder or ladder[0] >= DEEP_CAP_RATIO * default_w:
        return None
    top = ladder[0]
    return (
        f"a top rung of at least {DEEP_CAP_RATIO:.0%} of this card's default limit {default_w:g} W "
        f'(fixes: a relative ladder such as ladder_w = ["100%", "90%"], a [[gpu]] override with a '
        "ladder for this card, or power.allow_deep_cap = true for a deliberate deep cap)",
        f"a top rung of {top:g} W ({top / default_w:.0%} of {default_w:g} W)",
    )


def is_loopback(address: str) -> bool:
    """True for an address only this host can reach: 127.0.0.0/8, ::1 (also IPv4-mapped) or ``localhost``."""
    if address.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # a host name: it may resolve to anything
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _readable_file(path: str) -> str | None:
    """None when ``path`` is a regular file we can open for reading, else what is wrong with it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "no such file"
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
    finally:
        os.close(fd)
    return None


def _no_passphrase() -> bytes:
    return b""  # an encrypted key then fails to load instead of prompting on a terminal


def _tls_loads(m: MetricsConfig, prefix: str, out: Issues) -> None:
    """Load the certificate, key and CA as the server will, so check-config reports what it would hit."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(m.tls_cert_file, m.tls_key_file, password=_no_passphrase)
    except (OSError, ValueError) as exc:
        out.add(
            f"{prefix}metrics.tls_cert_file",
            "a PEM certificate and its matching unencrypted private key (metrics.tls_key_file)",
            describe(str(exc)),
        )
    if m.tls_client_ca_file:
        try:
            context.load_verify_locations(cafile=m.tls_client_ca_file)
        except (OSError, ValueError) as exc:
            out.add(f"{prefix}metrics.tls_client_ca_file", "a PEM CA certificate file", describe(str(exc)))


def _metrics_contradictions(m: MetricsConfig, prefix: str, out: Issues) -> None:
    """Pairs set together, a remote bind only when allowed, TLS files readable and loadable."""
    pairs = (
        ("tls_cert_file", m.tls_cert_file, "tls_key_file", m.tls_key_file),
        ("basic_auth_username", m.basic_auth_username, "basic_auth_password_hash", m.basic_auth_password_hash),
    )
    for a_name, a, b_name, b in pairs:
        if bool(a) != bool(b):
            missing, present = (b_name, a_name) if a else (a_name, b_name)
            out.add(
                f"{prefix}metrics.{missing}", f"a value too, since metrics.{present} is set (both or neither)", "''"
            )
    if ":" in m.basic_auth_username or not m.basic_auth_username.isprintable():
        out.add(
            f"{prefix}metrics.basic_auth_username",
            "a user name without ':' or control characters",
            describe(m.basic_auth_username),
        )
    if m.tls_client_ca_file and not m.tls:
        out.add(
            f"{prefix}metrics.tls_client_ca_file",
            "metrics.tls_cert_file and metrics.tls_key_file too (client certificates need TLS)",
            describe(m.tls_client_ca_file),
        )
    if m.basic_auth_password_hash:
        from governor.auth import HASH_FORMAT, parse_password_hash

        try:
            parse_password_hash(m.basic_auth_password_hash)
        except ValueError as exc:
            # The value is never echoed: it may be a password pasted in by mistake.
            out.add(
                f"{prefix}metrics.basic_auth_password_hash",
                f"a bcrypt hash from `gpu-governor hash-password`, or an old one of the form {HASH_FORMAT}",
                f"a value that is {exc}",
            )
    if not m.enabled:
        return  # nothing is bound and no file is read
    if m.web_config_file and m.deprecated_keys:
        out.add(
            f"{prefix}metrics.web_config_file",
            "either web_config_file or the deprecated TLS and basic-auth keys, not both "
            f"(move {', '.join(m.deprecated_keys)} into the web-config file: docs/security.md)",
            describe(m.web_config_file),
        )
    if m.web_config_file:
        from governor.webconfig import load_web_config

        try:
            load_web_config(m.web_config_file, trust_euid=os.geteuid())
        except ConfigError as exc:
            for issue in exc.issues:  # each names the web-config file and its key
                if not issue.key and issue.file == m.web_config_file:  # the file itself: the key that named it
                    got = f"{short(m.web_config_file, 120)}: {issue.got}"
                    out.add(f"{prefix}metrics.web_config_file", issue.expected, got)
                else:
                    out.issues.append(issue)
    if not m.allow_remote and not is_loopback(m.listen_address):
        out.add(
            f"{prefix}metrics.listen_address",
            "a loopback address (127.0.0.1, ::1, localhost), or metrics.allow_remote = true "
            "to serve other hosts (see docs/security.md)",
            describe(m.listen_address),
        )
    readable = True
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        path = getattr(m, name)
        problem = _readable_file(path) if path else None
        if problem is not None:
            out.add(f"{prefix}metrics.{name}", "a readable file", f"{describe(path)}: {problem}")
            readable = False
    if readable and m.tls:
        _tls_loads(m, prefix, out)


def check_metrics(metrics: MetricsConfig, source: str) -> None:
    """The [metrics] cross-checks alone, for values set outside a file (``run --listen``); raise ConfigError."""
    out = Issues(source)
    _metrics_contradictions(metrics, "", out)
    if out.issues:
        raise ConfigError(out.issues)


def parse_config(data: Mapping[str, Any], source: str) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    out = Issues(source)
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    raw_gpus: Any = None
    known_top = [*SCHEMA, "gpu", "vram", "class"]
    for name, value in data.items():
        if name == "gpu":
            raw_gpus = value
            continue
        if name in ("vram", "class"):
            continue
        spec = SCHEMA.get(name)
        if spec is None:
            unknown(name, name, known_top, out)
        elif isinstance(spec, Key):
            converted = convert(spec, value, name, out)
            if converted is not None:
                top[name] = converted
        else:
            table = table_of(value, name, out)
            if table is not None:
                sections[name] = section(table, spec, f"{name}.", out)

    thermal = replace(ThermalPolicy(), **sections.get("thermal", {}))
    power = replace(PowerPolicy(), **sections.get("power", {}))
    fan = replace(FanPolicy(), **sections.get("fan", {}))
    _thermal_contradictions(thermal, "", out)
    _power_contradictions(power, "", out)
    _target_contradictions(GpuPolicy(thermal, power), float(top.get("poll_interval_s", 1.0)), "", out)
    _fan_contradictions(fan, "", out)
    node = replace(NodePolicy(), **sections.get("node", {}))
    metrics = replace(MetricsConfig(), **sections.get("metrics", {}))
    _metrics_contradictions(metrics, "", out)

    overrides: list[GpuOverride] = []
    if raw_gpus is not None:
        if not isinstance(raw_gpus, list):
            out.add("gpu", "an array of tables ([[gpu]])", describe(raw_gpus))
        else:
            for i, entry in enumerate(raw_gpus):
                override = _parse_override(entry, f"gpu[{i}]", thermal, power, out, fan)
                if override is not None:
                    overrides.append(override)

    vram = parse_vram(data.get("vram"), data.get("class"), out)

    if out.issues:
        raise ConfigError(out.issues)
    return Config(
        vram=vram,
        source=source,
        metrics=metrics,
        logging=replace(LoggingConfig(), **sections.get("logging", {})),
        simulation=replace(SimulationConfig(), **sections.get("simulation", {})),
        thermal=thermal,
        power=power,
        fan=fan,
        gpus=tuple(overrides),
        node=node,
        **top,
    )


def _parse_override(
    entry: Any, path: str, thermal: ThermalPolicy, power: PowerPolicy, out: Issues, fan: FanPolicy | None = None
) -> GpuOverride | None:
    table = table_of(entry, path, out)
    if table is None:
        return None
    selectors: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {"thermal": {}, "power": {}, "fan": {}}
    known = [*GPU_SELECTORS, "thermal", "power", "fan"]
    for name, value in table.items():
        key_path = f"{path}.{name}"
        if name in GPU_SELECTORS:
            converted = convert(GPU_SELECTORS[name], value, key_path, out)
            if converted is not None:
                selectors[name] = converted
        elif name in parts:
            sub = table_of(value, key_path, out)
            if sub is not None:
                schema = {"thermal": THERMAL_KEYS, "power": POWER_KEYS, "fan": FAN_KEYS}[name]
                parts[name] = section(sub, schema, f"{key_path}.", out)
        else:
            unknown(key_path, name, known, out)
    if not selectors:
        out.add(path, "at least one of index, uuid or name to select GPUs", "no selector")
    # Contradictions inherited unchanged from the top level are reported there, once.
    if parts["thermal"].keys() & {"warning_c", "hot_c", "throttle_c", "critical_c"}:
        _thermal_contradictions(replace(thermal, **parts["thermal"]), f"{path}.", out)
    if parts["power"].keys() & {"step_up_at_c", "step_down_at_c"}:
        _power_contradictions(replace(power, **parts["power"]), f"{path}.", out)
    if parts["fan"].keys() & {"raise_at_c", "lower_at_c"}:
        _fan_contradictions(replace(fan or FanPolicy(), **parts["fan"]), f"{path}.", out)
    return GpuOverride(
        index=selectors.get("index"),
        uuid=selectors.get("uuid"),
        name=selectors.get("name"),
        thermal=parts["thermal"],
        power=parts["power"],
        fan=parts["fan"],
    )


def read_small_file(
    path: Path, error: type[ConfigError] = ConfigError, *, nofollow: bool = False, trust_euid: int | None = None
) -> bytes:
    """Read a config, profile or scenario file, refusing anything that is not a small regular file.

    The file is opened once and everything is checked on that one descriptor (fstat), so
    a writer that replaces the file meanwhile cannot make the checks and the read see two
    different files. ``nofollow`` refuses a symbolic link as the last component;
    ``trust_euid`` (the effective uid, for the config) applies :func:`check_trust`'s rules.
    """
    source = str(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        # Judged by its status before it is opened: opening a FIFO wakes its writer, opening a device
        # can act on it (a tape rewinds, a watchdog arms, a terminal becomes the controlling one).
        # The descriptor is checked again below: what is read is what is checked.
        mode = (os.lstat(path) if nofollow else os.stat(path)).st_mode  # a link (nofollow) fails the open
        if stat.S_ISDIR(mode):
            raise error([ConfigIssue(source, "", "a regular file", "a directory")])
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise error([ConfigIssue(source, "", "a regular file", "a device, pipe or directory")])
        # O_NONBLOCK: opening a FIFO with no writer would otherwise block forever.
        fd = os.open(path, flags)
        with open(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise error([ConfigIssue(source, "", "a regular file", "a directory")])
            if not stat.S_ISREG(info.st_mode):
                raise error([ConfigIssue(source, "", "a regular file", "a device, pipe or directory")])
            if trust_euid is not None:
                _check_trust_info(source, info, trust_euid)
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise error([ConfigIssue(source, "", "an existing file", "no such file")]) from None
    except IsADirectoryError:
        raise error([ConfigIssue(source, "", "a regular file", "a directory")]) from None
    except PermissionError:
        raise error([ConfigIssue(source, "", "a readable file", "permission denied")]) from None
    except OSError as exc:
        if nofollow and exc.errno == errno.ELOOP:
            raise error(
                [ConfigIssue(source, "", "a regular file, not a symbolic link (name its target)", "a symbolic link")]
            ) from None
        raise error([ConfigIssue(source, "", "a readable file", exc.strerror or str(exc))]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise error([ConfigIssue(source, "", f"a file of at most {MAX_CONFIG_BYTES} bytes", "a larger file")])
    return data


def check_trust(path: Path, euid: int | None = None) -> None:
    """When running as root, refuse a config that is not root-owned or is group/other-writable.

    The file decides which processes get signalled and which power limits get set,
    so anyone who can write it can act as root.
    """
    _check_trust_info(str(path), os.stat(path), os.geteuid() if euid is None else euid)


def _check_trust_info(source: str, info: os.stat_result, euid: int) -> None:
    """check_trust on the status of an open file (its owner and mode) and the directories above it
    (one another user may change could get a link to any root-owned file put in the file's place)."""
    if euid != 0:
        return
    swappable = untrusted_ancestor(Path(source))
    if swappable is not None:
        raise ConfigError([ConfigIssue(source, "", "a file below directories only root may change", swappable)])
    problems = root_trust_problems(info)
    if problems:
        raise ConfigError(
            [
                ConfigIssue(
                    source,
                    "",
                    "a file owned by root and writable only by root, since it decides "
                    "which processes are signalled (fix: chown root:root, chmod 644)",
                    " and ".join(problems),
                )
            ]
        )


def parse_toml(data: bytes, source: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """Decode and parse TOML bytes read from ``source``; ``error`` names the file on any failure."""
    text = config_text(data, source, "TOML", error)
    try:
        document: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error([ConfigIssue(source, "", "valid TOML", str(exc))]) from None
    except RecursionError:
        nesting = "TOML nested at most a few hundred levels deep"
        raise error([ConfigIssue(source, "", nesting, "deeper nesting")]) from None
    except ValueError as exc:  # an integer of more digits than Python converts (4300)
        raise error([ConfigIssue(source, "", "TOML the governor can read", short(str(exc), 120))]) from None
    return document


def load_config(path: Path | str, *, enforce_trust: bool = True) -> Config:
    """Read, parse and validate ``path``; raise ConfigError naming every problem.

    The file is read once through one descriptor, with the trust checks (owner, mode, a
    regular file) made on that descriptor, so what is checked is what is read. A symbolic
    link is followed (configuration management often links /etc files): only root can
    place one where the daemon looks, and the file it reaches must pass the same checks.
    Any failure at all - a nesting too deep for the parser, an integer too long to
    print, a bug - is a ConfigError, so a reload is refused and a start exits 3
    instead of the daemon dying on a file.
    """
    path = Path(path)
    source = str(path)
    data = read_small_file(path, trust_euid=os.geteuid() if enforce_trust else None)
    if not data.removeprefix(b"\xef\xbb\xbf").strip():
        # A truncated file (a failed write, a full disk) must not silently reset every setting.
        raise ConfigError(
            [ConfigIssue(source, "", "a TOML document (a file of only comments means all defaults)", "an empty file")]
        )
    try:
        return parse_config(parse_toml(data, source), source)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(
            [ConfigIssue(source, "", "TOML nested at most a few hundred levels deep", "deeper nesting")]
        ) from None
    except Exception as exc:  # whatever a hostile file triggers is its error
        detail = short(f"{type(exc).__name__}: {exc}", 120)
        raise ConfigError([ConfigIssue(source, "", "a config the governor can read", detail)]) from None


# --------------------------------------------------------------------------- output


def _toml_char(ch: str) -> str:
    """One character of a TOML basic string: quote, backslash and control characters escaped."""
    if ch in ('"', "\\"):
        return "\\" + ch
    if ch == "\t":
        return ch
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\u{ord(ch):04x}"
    return ch


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(ch) for ch in value) + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def render_config(config: Config) -> str:
    """The effective configuration as TOML (defaults merged), loadable again."""
    source = "".join(_toml_char(ch) if ch < " " or ch == "\x7f" else ch for ch in config.source)
    lines = [f"# effective configuration from {source}"]
    sections: list[tuple[str, Any]] = []
    for f in fields(config):
        if f.name in ("source", "gpus", "vram"):
            continue
        value = getattr(config, f.name)
        if hasattr(value, "__dataclass_fields__"):
            sections.append((f.name, value))
        elif value is not None:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for name, table in sections:
        lines.append("")
        lines.append(f"[{name}]")
        for f in fields(table):
            value = getattr(table, f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
    for override in config.gpus:
        lines.append("")
        lines.append("[[gpu]]")
        for selector in ("index", "uuid", "name"):
            value = getattr(override, selector)
            if value is not None:
                lines.append(f"{selector} = {_toml_value(value)}")
        for part in ("thermal", "power", "fan"):
            values = getattr(override, part)
            if values:
                lines.append(f"{part} = {_toml_value(dict(values))}")
    lines.extend(_render_vram(config.vram))
    return "\n".join(lines) + "\n"


def _render_class_body(klass: Any, lines: list[str], *, default: bool = False) -> None:
    """A class's keys as TOML lines; a named class always gets its match table (an empty one
    too: it parses back as written, a class that never matches, where leaving it out would not)."""
    from governor.classes import MATCH_KEYS, render_size

    if klass.budget_bytes is not None:
        lines.append(f"budget = {_toml_value(render_size(klass.budget_bytes))}")
    for name in ("priority", "action", "grace_s", "kill_after_s", "dry_run", "protected"):
        lines.append(f"{name} = {_toml_value(getattr(klass, name))}")
    for name in (
        "resume",
        "resume_after_s",
        "resume_after_max_s",
        "flap_window_s",
        "restart_loop_count",
        "restart_loop_window_s",
    ):
        lines.append(f"{name} = {_toml_value(getattr(klass, name))}")
    match = {}
    for key in MATCH_KEYS:
        value = getattr(klass.match, key, None)
        if value is not None:
            match[key] = value if isinstance(value, str) else value.pattern
    if klass.match.user_units:
        match["user_units"] = True
    if not default:
        lines.append(f"match = {_toml_value(match)}")


def _render_vram(vram: VramPolicy) -> list[str]:
    from governor.classes import render_size

    lines = ["", "[vram]"]
    lines.append(f"enabled = {_toml_value(vram.enabled)}")
    lines.append(f"reserve = {_toml_value(render_size(vram.reserve_bytes))}")
    for name in ("pressure_used_ratio", "cooldown_s", "dry_run", "per_process_metrics", "protected_names"):
        lines.append(f"{name} = {_toml_value(getattr(vram, name))}")
    lines += ["", "[vram.default]"]
    _render_class_body(vram.default_class, lines, default=True)
    for klass in vram.classes:
        lines += ["", "[[class]]", f"name = {_toml_value(klass.name)}"]
        _render_class_body(klass, lines)
    return lines
