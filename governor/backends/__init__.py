"""Hardware backends behind one small Protocol.

A backend reads every GPU into a :class:`~governor.model.Snapshot`, sets power
limits and fan speeds. It never decides anything. Only :mod:`governor.actuator` (and its
fan half, :mod:`governor.fanactuator`) calls the setters.

The Protocol declares every member the governor uses, the optional ones included
(``waiting_reason``, ``state_warning``), so callers use plain attribute access and
never probe a backend with ``getattr``; a backend without the feature answers None.

The errors live in :mod:`governor.errors` (one hierarchy) and are re-exported here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from governor.errors import (
    BackendError,
    BackendFatal,
    BackendUnavailable,
    GpuError,
    GpuLostError,
    SetLimitFailed,
    SetLimitRefused,
)
from governor.model import GpuInfo, Snapshot

__all__ = [
    "Backend",
    "BackendError",
    "BackendFatal",
    "BackendUnavailable",
    "GpuError",
    "GpuLostError",
    "SetLimitFailed",
    "SetLimitRefused",
]


@runtime_checkable
class Backend(Protocol):
    """What the daemon needs from hardware: facts, one read per tick, one setter."""

    name: str

    @property
    def waiting_reason(self) -> str | None:
        """Why the backend has no GPUs yet (the driver is not loaded: it retries), or None."""
        ...

    @property
    def state_warning(self) -> str | None:
        """A problem with the backend's own saved state worth one warning at start, or None."""
        ...

    def gpus(self) -> tuple[GpuInfo, ...]:
        """Facts of every GPU, in index order (read at open; a new tuple when a GPU appeared or a
        power-limit range changed: the caller follows it every tick)."""
        ...

    def read(self) -> Snapshot:
        """Read every GPU now. A failing GPU yields a reading with health set, not an exception.

        Raises BackendFatal when the whole backend broke (only a restart helps).
        """
        ...

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Set the GPU's power limit in watts.

        Raises a GpuError (SetLimitRefused, SetLimitFailed, GpuLostError) when this GPU or
        this change failed, BackendFatal when the backend broke.
        """
        ...

    def set_fan_speed(self, uuid: str, fan: int, percent: int) -> None:
        """Set fan ``fan`` of the GPU to ``percent`` of its maximum speed (manual control).

        Raises SetLimitRefused when the GPU's fans cannot be set (no permission, not
        supported: no fans), SetLimitFailed or GpuLostError when this change failed.
        """
        ...

    def set_fan_auto(self, uuid: str, fan: int) -> None:
        """Hand fan ``fan`` of the GPU back to the card's automatic control; errors as set_fan_speed."""
        ...

    def close(self) -> None:
        """Release the hardware library. Idempotent."""
        ...
