"""A backend that waits for its hardware: for a driver that loads after the service starts.

At boot the NVIDIA kernel module can load after gpu-governor starts. Rather than exit
and be restarted in a loop, the daemon wraps the real backend in
:class:`DeferredBackend`: until the real one opens, it has no GPUs, every read is an
empty snapshot and ``waiting_reason`` says why. It retries on a backoff (1 s doubling
to 60 s, times from the clock), and from the first successful open on it is the real
backend. The daemon notices the GPUs appear and starts governing them.
"""

from __future__ import annotations

from collections.abc import Callable

from governor.backends import Backend, BackendUnavailable, GpuLostError
from governor.clock import Clock
from governor.model import GpuInfo, Snapshot


class DeferredBackend:
    """Opens ``factory()`` lazily, retrying while it raises BackendUnavailable."""

    def __init__(
        self,
        factory: Callable[[], Backend],
        clock: Clock,
        *,
        name: str,
        first_retry_s: float = 1.0,
        max_retry_s: float = 60.0,
    ) -> None:
        self._factory = factory
        self._clock = clock
        self._inner: Backend | None = None
        self.name = name  # the real backend's name once open
        self._first_retry_s = first_retry_s
        self._max_retry_s = max_retry_s
        self._retry_s = first_retry_s
        self._next_try_s = clock.monotonic()
        self.waiting_reason: str | None = "not opened yet"
        self.attempts = 0
        self._try_open()

    @property
    def state_warning(self) -> str | None:
        """The real backend's state warning once open, else None."""
        return self._inner.state_warning if self._inner is not None else None

    @property
    def opened(self) -> bool:
        """True once the real backend is open."""
        return self._inner is not None

    def _try_open(self) -> None:
        now = self._clock.monotonic()
        if self._inner is not None or now < self._next_try_s:
            return
        self.attempts += 1
        try:
            self._inner = self._factory()
        except BackendUnavailable as exc:
            self.waiting_reason = str(exc)
            self._next_try_s = now + self._retry_s
            self._retry_s = min(self._retry_s * 2, self._max_retry_s)
            return
        self.waiting_reason = None
        self.name = self._inner.name

    def gpus(self) -> tuple[GpuInfo, ...]:
        """The real backend's GPUs, or none while waiting."""
        return self._inner.gpus() if self._inner is not None else ()

    def read(self) -> Snapshot:
        """Read through the real backend; while waiting, try to open it when due and read nothing."""
        self._try_open()
        if self._inner is not None:
            return self._inner.read()
        return Snapshot(t_s=self._clock.monotonic(), wall_time_s=self._clock.wall(), gpus=())

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Delegate; there is no GPU to set while waiting."""
        if self._inner is None:
            raise GpuLostError(f"no backend yet: {self.waiting_reason}")
        self._inner.set_power_limit(uuid, limit_w)

    def set_fan_speed(self, uuid: str, fan: int, percent: int) -> None:
        """Delegate; there is no GPU to set while waiting."""
        if self._inner is None:
            raise GpuLostError(f"no backend yet: {self.waiting_reason}")
        self._inner.set_fan_speed(uuid, fan, percent)

    def set_fan_auto(self, uuid: str, fan: int) -> None:
        """Delegate; there is no GPU to set while waiting."""
        if self._inner is None:
            raise GpuLostError(f"no backend yet: {self.waiting_reason}")
        self._inner.set_fan_auto(uuid, fan)

    def close(self) -> None:
        """Close the real backend if it was opened."""
        if self._inner is not None:
            self._inner.close()
