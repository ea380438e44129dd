"""Small builders shared by the rule, actuator and property tests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from governor.backends import BackendError
from governor.model import GpuHealth, GpuInfo, GpuReading, GpuTelemetry, Snapshot

H100 = GpuInfo(
    index=0,
    uuid="GPU-h100",
    name="NVIDIA H100 80GB HBM3",
    power_limit_min_w=200.0,
    power_limit_max_w=700.0,
    power_limit_default_w=700.0,
)
"""A GPU whose allowed range (200-700 W) clamps a 180 W rung."""

CARD_200W = GpuInfo(
    index=1,
    uuid="GPU-200w",
    name="NVIDIA GeForce RTX 4070",
    power_limit_min_w=100.0,
    power_limit_max_w=220.0,
    power_limit_default_w=200.0,
)
"""A 200 W card: both default rungs (200 W, 180 W) fit its range."""

FAN_CARD = replace(CARD_200W, fan_count=2, fan_speed_min_percent=30.0, fan_speed_max_percent=100.0)
"""The 200 W card with two fans the driver lets the governor set (30-100 %)."""


def fan_reading(temperature_c: float | None, fans_percent: tuple[float, ...] | None = (45.0, 45.0)) -> GpuReading:
    """A reading of FAN_CARD at ``temperature_c`` (C) with its fans measured at ``fans_percent`` (%)."""
    ratios = None if fans_percent is None else tuple((i, p / 100.0) for i, p in enumerate(fans_percent))
    return GpuReading(
        index=FAN_CARD.index,
        uuid=FAN_CARD.uuid,
        temperature_c=temperature_c,
        power_limit_w=200.0,
        telemetry=GpuTelemetry(fan_speed_ratios=ratios),
    )


def reading(
    temperature_c: float | None,
    power_limit_w: float | None = 200.0,
    gpu: GpuInfo = CARD_200W,
    health: GpuHealth = GpuHealth.OK,
) -> GpuReading:
    """A reading of ``gpu`` with the given temperature and enforced limit."""
    return GpuReading(
        index=gpu.index,
        uuid=gpu.uuid,
        temperature_c=temperature_c,
        power_limit_w=power_limit_w,
        health=health,
    )


def snapshot(t_s: float, readings: Iterable[GpuReading]) -> Snapshot:
    """A snapshot at monotonic ``t_s`` (wall time equal, for simplicity)."""
    return Snapshot(t_s=t_s, wall_time_s=t_s, gpus=tuple(readings))


@dataclass
class RecordingBackend:
    """A Backend test double that records every set_power_limit call and can be told to fail."""

    infos: tuple[GpuInfo, ...] = (CARD_200W,)
    fail_with: BackendError | None = None
    calls: list[tuple[str, float]] = field(default_factory=list)
    fan_calls: list[tuple[str, int, int | None]] = field(default_factory=list)
    name: str = "recording"
    waiting_reason: str | None = None
    state_warning: str | None = None

    def gpus(self) -> tuple[GpuInfo, ...]:
        """The GPUs this double pretends to have."""
        return self.infos

    def read(self) -> Snapshot:
        """An empty snapshot; the actuator never reads."""
        return snapshot(0.0, ())

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Record the call, then raise ``fail_with`` if set."""
        self.calls.append((uuid, limit_w))
        if self.fail_with is not None:
            raise self.fail_with

    def set_fan_speed(self, uuid: str, fan: int, percent: int) -> None:
        """Record the call as (uuid, fan, percent), then raise ``fail_with`` if set."""
        self.fan_calls.append((uuid, fan, percent))
        if self.fail_with is not None:
            raise self.fail_with

    def set_fan_auto(self, uuid: str, fan: int) -> None:
        """Record the call as (uuid, fan, None), then raise ``fail_with`` if set."""
        self.fan_calls.append((uuid, fan, None))
        if self.fail_with is not None:
            raise self.fail_with

    def close(self) -> None:
        """Nothing to release."""
