"""Hardware backends behind one small Protocol.

A backend reads every GPU into a :class:`~governor.model.Snapshot` and sets power
limits. It never decides anything. Only :mod:`governor.actuator` calls
:meth:`Backend.set_power_limit`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from governor.model import GpuInfo, Snapshot


class BackendError(Exception):
    """Base of every error a backend raises."""


class BackendUnavailable(BackendError):
    """The backend cannot start at all (no NVIDIA driver, no library)."""


class BackendFatal(BackendError):
    """The backend broke in a way only a restart can fix (driver upgraded under us)."""


class GpuLostError(BackendError):
    """The GPU stopped answering."""


class SetLimitRefused(BackendError):
    """Setting a power limit is not permitted or not supported on this GPU.

    The governor marks the GPU monitor-only rather than retrying every tick.
    """


class SetLimitFailed(BackendError):
    """Setting a power limit failed in a way that may pass on a later try."""


@runtime_checkable
class Backend(Protocol):
    """What the daemon needs from hardware: facts, one read per tick, one setter."""

    name: str

    def gpus(self) -> tuple[GpuInfo, ...]:
        """Static facts of every GPU, in index order (read once at open)."""
        ...

    def read(self) -> Snapshot:
        """Read every GPU now. A failing GPU yields a reading with health set, not an exception."""
        ...

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Set the GPU's power limit in watts. Raises SetLimitRefused, SetLimitFailed, GpuLostError."""
        ...

    def close(self) -> None:
        """Release the hardware library. Idempotent."""
        ...
