"""The thermal zone state machine (pure).

A zone is entered as soon as the temperature is at or above its threshold and left
only once the temperature has fallen below ``threshold - hysteresis_c`` (thermald's
trip semantics), so a reading that wobbles around a threshold does not flap.
A missing temperature gives the ``unknown`` zone: nothing is inferred from it.
"""

from __future__ import annotations

from governor.model import Decision, GpuReading
from governor.policy import Action, Rule, ThermalPolicy, ThermalZone


def thresholds(policy: ThermalPolicy) -> tuple[tuple[ThermalZone, float], ...]:
    """Lower bounds in degrees C of every zone above optimal, coolest first."""
    return (
        (ThermalZone.WARNING, policy.warning_c),
        (ThermalZone.HOT, policy.hot_c),
        (ThermalZone.THROTTLE, policy.throttle_c),
        (ThermalZone.CRITICAL, policy.critical_c),
    )


def raw_zone(temperature_c: float, policy: ThermalPolicy) -> ThermalZone:
    """The zone a temperature falls in, ignoring hysteresis."""
    zone = ThermalZone.OPTIMAL
    for candidate, lower_c in thresholds(policy):
        if temperature_c >= lower_c:
            zone = candidate
    return zone


def next_zone(temperature_c: float | None, policy: ThermalPolicy, previous: ThermalZone) -> ThermalZone:
    """The zone after this reading, given the zone before it.

    Rising is immediate; falling needs the temperature ``hysteresis_c`` below the
    threshold of the zone being left, and then lands in the zone that the
    temperature plus hysteresis falls in.
    """
    if temperature_c is None:
        return ThermalZone.UNKNOWN
    rising = raw_zone(temperature_c, policy)
    if rising is previous or previous is ThermalZone.UNKNOWN or rising.severity >= previous.severity:
        return rising
    falling = raw_zone(temperature_c + policy.hysteresis_c, policy)
    return falling if falling.severity < previous.severity else previous


def evaluate_zone(
    reading: GpuReading, policy: ThermalPolicy, previous: ThermalZone, t_s: float
) -> tuple[ThermalZone, Decision | None]:
    """New zone for ``reading`` and a ``thermal_zone`` decision when it changed."""
    zone = next_zone(reading.temperature_c, policy, previous)
    if zone is previous:
        return zone, None
    threshold: float | None = None
    if zone is not ThermalZone.UNKNOWN:
        rising = previous is ThermalZone.UNKNOWN or zone.severity > previous.severity
        bounds = dict(thresholds(policy))
        threshold = bounds.get(zone) if rising else bounds[previous] - policy.hysteresis_c
    if zone is ThermalZone.UNKNOWN:
        reason = "temperature reading missing"
    elif threshold is None:
        reason = f"temperature {reading.temperature_c:g} C below every zone threshold"
    elif previous is ThermalZone.UNKNOWN or zone.severity > previous.severity:
        reason = f"temperature {reading.temperature_c:g} C >= {threshold:g} C"
    else:
        reason = f"temperature {reading.temperature_c:g} C < {threshold:g} C (threshold - hysteresis)"
    decision = Decision(
        t_s=t_s,
        gpu_index=reading.index,
        gpu_uuid=reading.uuid,
        rule=Rule.THERMAL_ZONE,
        action=Action.NONE,
        reason=reason,
        reading=reading.temperature_c,
        threshold=threshold,
        from_zone=previous,
        to_zone=zone,
    )
    return zone, decision
