"""What the what-if commands share: their error type, durations, configs and labels."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from governor import durations
from governor.classes import VramPolicy
from governor.clock import VirtualClock
from governor.config import Config, load_config
from governor.core import Observer
from governor.errors import WhatIfError as WhatIfError  # noqa: PLC0414  (re-exported)
from governor.notify import Notifier
from governor.policy import FanMode
from governor.processes import ProcessFacts, classified
from governor.service import Service
from governor.waiting import VirtualWaiter

EXIT_USAGE = 2
"""Exit code for bad input named on the command line (a missing trace, a bad duration)."""

NOT_A_PID = -1
"""The governor's own PID as far as a what-if run is concerned: no recorded or simulated process is it."""

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
    """``config`` with the power ladder, fan control and VRAM enforcement off everywhere: the
    no-governor baseline."""
    overrides = tuple(
        replace(o, power={**o.power, "enabled": False}, fan={**o.fan, "mode": "auto"}) for o in config.gpus
    )
    return replace(
        config,
        source="no governor",
        power=replace(config.power, enabled=False),
        fan=replace(config.fan, mode=FanMode.AUTO),
        gpus=overrides,
        vram=replace(config.vram, enabled=False),
    )


class NameInspector:
    """Process facts from a process's reported name alone, cached per (pid, name) and policy.

    For processes that have no ``/proc`` entry here: a recorded trace's (replay), or the
    simulator's synthetic ones (PIDs above any the kernel hands out). Their start time is
    unknown, so the VRAM rule reports them but never picks one to be signalled; classes
    that match on anything but ``name`` cannot match. ``own_pid`` is the governor's own
    PID as far as protection goes (replay passes one no process has).
    """

    def __init__(self, own_pid: int) -> None:
        self.own_pid = own_pid
        self._policy: VramPolicy | None = None
        self._cache: dict[tuple[int, str | None], ProcessFacts] = {}

    def mark_listing(self) -> None:
        """Nothing to mark: no PID here can be reused under a listing."""

    def facts(self, pid: int, reported_name: str | None, policy: VramPolicy) -> ProcessFacts:
        """The facts and class of ``pid`` from ``reported_name`` under ``policy``."""
        if policy is not self._policy:
            self._cache.clear()
            self._policy = policy
        key = (pid, reported_name)
        found = self._cache.get(key)
        if found is None:
            draft = ProcessFacts.of(
                pid=pid,
                start_time=None,
                name=reported_name,
                exe=None,
                cmdline=None,
                uid=None,
                user=None,
                cgroup=None,
                unit=None,
                slices=(),
                kernel_thread=False,
                klass=policy.default_class.name,
                why="",
                protected=None,
            )
            found = self._cache[key] = classified(draft, policy, self.own_pid)
        return found

    def forget_except(self, live: Iterable[int]) -> None:
        """Drop the facts of PIDs not in ``live`` (once the cache has grown past a few dozen)."""
        if len(self._cache) < 64:
            return
        keep = set(live)
        for key in [k for k in self._cache if k[0] not in keep]:
            del self._cache[key]

    def clear(self) -> None:
        """Forget every cached fact."""
        self._cache.clear()


class _SilentNotifier(Notifier):
    """A notifier that never talks to systemd: a what-if run is not the service."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = False
        self.watchdog_interval_s = None

    def _send(self, message: str) -> None:
        """Send nothing."""


def _drop(*_args: Any, **_fields: Any) -> None:
    return None


class _Quiet:
    """A logger that drops every event: a what-if run reports through its recorder, not a log."""

    def __getattr__(self, name: str) -> Any:
        return _drop


def run_service(
    config: Config,
    backend: Any,
    clock: VirtualClock,
    waiter: VirtualWaiter,
    observer: Observer,
    prefix: str,
    **simulation: Any,
) -> None:
    """Run ``config``'s policy through the real service on the simulated ``backend`` until
    ``waiter`` stops it, ``observer`` its only observer.

    The config's backend, ``dry_run``, ``state_dir`` (a temporary directory named
    ``prefix``...), runtime directory (none: never the real governor's process table) and
    metrics (off) are replaced, and ``[simulation]`` takes ``simulation``'s keys and no
    state file: the run acts on the simulated GPUs only and serves nothing. Its processes
    are classified by name (the simulator's PIDs are above any real one: no /proc), no
    log is written and systemd is never told.
    """
    with tempfile.TemporaryDirectory(prefix=prefix) as state_dir:
        run_config = replace(
            config,
            backend="simulated",
            dry_run=False,
            state_dir=state_dir,
            runtime_dir="",
            metrics=replace(config.metrics, enabled=False),
            simulation=replace(config.simulation, state_file="", **simulation),
        )
        service = Service(
            run_config,
            backend,
            clock,
            waiter=waiter,
            notifier=_SilentNotifier(),
            inspector=NameInspector(NOT_A_PID),
            observers=(observer,),
            log=_Quiet(),
        )
        service.run()
