"""Fan control through NVML (R520 and later drivers; no X server needed).

Static facts, read once per GPU when it opens: the fan count (``nvmlDeviceGetNumFans``,
NotSupported on data-center boards, which have no fans of their own) and the speed range
a fan may be set to (``nvmlDeviceGetMinMaxFanSpeed``, percent of the fan's maximum).

Writes: ``nvmlDeviceSetFanSpeed_v2(handle, fan, percent)`` sets a fan and switches it to
manual control; ``nvmlDeviceSetDefaultFanSpeed_v2(handle, fan)`` hands it back to the
card's automatic (temperature-driven) control, and where a driver or the bindings lack
that call, ``nvmlDeviceSetFanControlPolicy(handle, fan, NVML_FAN_POLICY_TEMPERATURE_CONTINOUS_SW)``
does. The speed a fan runs at is read back as telemetry (``nvmlDeviceGetFanSpeed_v2``).

By the kind of NVML error (:mod:`governor.backends._nvml_errors`): UNSUPPORTED, DENIED and
a missing call (an old driver or old bindings) raise SetLimitRefused (the GPU's fans turn
monitor-only), LOST GpuLostError, FATAL BackendFatal, anything else SetLimitFailed.
"""

from __future__ import annotations

from typing import Any

from governor.backends._nvml_errors import Kind, NvmlCaller, NvmlFailure
from governor.errors import GpuLostError, SetLimitFailed, SetLimitRefused

FAN_POLICY_CONTINUOUS = 0
"""NVML_FAN_POLICY_TEMPERATURE_CONTINOUS_SW (sic): the driver's automatic, temperature-driven control."""


def fan_range_percent(call: NvmlCaller, nvml: Any, handle: Any) -> tuple[float | None, float | None]:
    """(lowest, highest) speed a fan of this GPU may be set to, percent; (None, None) when unknown."""
    read = getattr(nvml, "nvmlDeviceGetMinMaxFanSpeed", None)
    if read is None:
        return None, None
    try:
        low, high = call(read, handle)
    except NvmlFailure as exc:
        if exc.kind is Kind.LOST:
            raise
        return None, None
    return float(low), float(high)


def _write(call: NvmlCaller, fn: Any, args: tuple[Any, ...], where: str) -> None:
    """One fan write; the NVML error mapped as the module docstring says."""
    if fn is None:
        raise SetLimitRefused(f"{where} was refused: this NVIDIA driver's bindings cannot set fans (needs R520+)")
    try:
        call(fn, *args)
    except NvmlFailure as exc:
        if exc.kind in (Kind.UNSUPPORTED, Kind.DENIED, Kind.MISSING_CALL):
            raise SetLimitRefused(f"{where} was refused: {exc}") from None
        if exc.kind is Kind.LOST:
            raise GpuLostError(f"{where} failed: {exc}") from None
        raise SetLimitFailed(f"{where} failed: {exc}") from None


def set_fan_speed(call: NvmlCaller, nvml: Any, handle: Any, label: str, fan: int, percent: int) -> None:
    """Set one fan to ``percent`` (manual control); ``label`` names the GPU in errors."""
    if not 0 <= percent <= 100:
        raise SetLimitFailed(f"{label}: fan speed must be 0-100 %, got {percent!r}")
    fn = getattr(nvml, "nvmlDeviceSetFanSpeed_v2", None)
    _write(call, fn, (handle, fan, int(percent)), f"{label}: setting fan {fan} to {percent} %")


def set_fan_auto(call: NvmlCaller, nvml: Any, handle: Any, label: str, fan: int) -> None:
    """Hand one fan back to the card's automatic control."""
    where = f"{label}: handing fan {fan} back to automatic control"
    fn = getattr(nvml, "nvmlDeviceSetDefaultFanSpeed_v2", None)
    policy = getattr(nvml, "nvmlDeviceSetFanControlPolicy", None)
    if fn is not None:
        try:
            _write(call, fn, (handle, fan), where)
            return
        except SetLimitRefused:
            if policy is None:
                raise
    continuous = int(getattr(nvml, "NVML_FAN_POLICY_TEMPERATURE_CONTINOUS_SW", FAN_POLICY_CONTINUOUS))
    _write(call, policy, (handle, fan, continuous), where)
