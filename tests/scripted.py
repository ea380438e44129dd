"""A scripted backend for daemon tests: temperatures come from a list, limits are remembered.

Not a GPU model (that is governor.backends.simulated): it exists so a daemon test can
say exactly what each tick reads.
"""

from __future__ import annotations

from collections.abc import Callable

from governor.backends import SetLimitRefused
from governor.clock import Clock
from governor.model import GpuHealth, GpuInfo, GpuReading, Snapshot


class ScriptedBackend:
    """One or more GPUs whose temperature is ``script(t_s, index)``; limits stick like hardware."""

    name = "scripted"
    waiting_reason: str | None = None
    state_warning: str | None = None

    def __init__(
        self,
        clock: Clock,
        script: Callable[[float, int], float | None],
        *,
        gpu_count: int = 1,
        limit_w: float = 200.0,
        min_w: float = 100.0,
        max_w: float = 220.0,
        refuse: bool = False,
    ) -> None:
        self.clock = clock
        self.script = script
        self.infos = tuple(
            GpuInfo(
                index=i,
                uuid=f"GPU-test-{i}",
                name="Test GPU",
                power_limit_min_w=min_w,
                power_limit_max_w=max_w,
                power_limit_default_w=limit_w,
                memory_total_bytes=12 * 2**30,
            )
            for i in range(gpu_count)
        )
        self.limits_w = {g.uuid: limit_w for g in self.infos}
        self.sets: list[tuple[str, float]] = []
        self.refuse = refuse
        self.closed = False
        self.reads = 0

    def gpus(self) -> tuple[GpuInfo, ...]:
        """The scripted GPUs."""
        return self.infos

    def read(self) -> Snapshot:
        """Temperatures from the script at the clock's time; limits as last set."""
        self.reads += 1
        t = self.clock.monotonic()
        readings = []
        for g in self.infos:
            temp = self.script(t, g.index)
            readings.append(
                GpuReading(
                    index=g.index,
                    uuid=g.uuid,
                    temperature_c=temp,
                    power_w=min(self.limits_w[g.uuid], 190.0),
                    power_limit_w=self.limits_w[g.uuid],
                    memory_used_bytes=2**30,
                    memory_total_bytes=12 * 2**30,
                    health=GpuHealth.OK if temp is not None else GpuHealth.DEGRADED,
                )
            )
        return Snapshot(t_s=t, wall_time_s=self.clock.wall(), gpus=tuple(readings))

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Remember the limit (or refuse, when told to)."""
        if self.refuse:
            raise SetLimitRefused("NVML: insufficient permissions")
        self.sets.append((uuid, limit_w))
        self.limits_w[uuid] = limit_w

    def set_fan_speed(self, uuid: str, fan: int, percent: int) -> None:
        """The scripted GPUs report no fans: NotSupported."""
        raise SetLimitRefused(f"{uuid}: fan {fan}: Not Supported")

    def set_fan_auto(self, uuid: str, fan: int) -> None:
        """The scripted GPUs report no fans: NotSupported."""
        raise SetLimitRefused(f"{uuid}: fan {fan}: Not Supported")

    def close(self) -> None:
        """Mark closed."""
        self.closed = True
