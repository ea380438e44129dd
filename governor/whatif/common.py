"""What the what-if commands share: their error type, durations, configs and labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from governor import durations
from governor.config import Config, load_config
from governor.errors import WhatIfError as WhatIfError  # noqa: PLC0414  (re-exported)

EXIT_USAGE = 2
"""Exit code for bad input named on the command line (a missing trace, a bad duration)."""

MAX_DURATION_S = durations.MAX_DURATION_S
"""The longest simulation accepted: a year of simulated time."""


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``24h``, ``90m``, ``3600s``, ``3600`` or ``1h30m``.

    The one parser of :mod:`governor.durations`; raises WhatIfError naming ``--duration``
    for anything else, for 0 and for more than a year.
    """
    try:
        return durations.parse_seconds(text)
    except ValueError as exc:
        raise WhatIfError(f"--duration: {exc}") from None


def format_duration(seconds: float) -> str:
    """A short human form of ``seconds``: ``24h``, ``1h30m``, ``90s``."""
    whole = round(seconds)
    if abs(seconds - whole) > 1e-6 or whole < 60:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts)


def load_policy_config(path: Path | None) -> Config:
    """The config whose policy a what-if run plays: built-in defaults when ``path`` is None.

    Ownership is not checked (what-if commands change nothing on the machine); an
    invalid file raises ConfigError like ``check-config``.
    """
    if path is None:
        return Config(source="defaults")
    return load_config(path, enforce_trust=False)


def config_label(config: Config) -> str:
    """A short name for a config in tables and legends: the file's stem, or ``defaults``."""
    if config.source == "defaults":
        return "defaults"
    return Path(config.source).stem or config.source


def unique_labels(configs: list[Config]) -> list[str]:
    """Labels for ``configs``, using the whole path where two stems collide."""
    labels = [config_label(c) for c in configs]
    return [c.source if labels.count(label) > 1 else label for c, label in zip(configs, labels)]


def without_governor(config: Config) -> Config:
    """``config`` with the power ladder and VRAM enforcement off everywhere: the no-governor baseline."""
    overrides = tuple(replace(o, power={**o.power, "enabled": False}) for o in config.gpus)
    return replace(
        config,
        source="no governor",
        power=replace(config.power, enabled=False),
        gpus=overrides,
        vram=replace(config.vram, enabled=False),
    )
