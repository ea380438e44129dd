"""The thermal zone state machine (pure).

A zone is entered as soon as the temperature is at or above its threshold and left
only once the temperature has fallen below ``threshold - hysteresis_c`` (thermald's
trip semantics), so a reading that wobbles around a threshold does not flap.
A missing temperature gives the ``unknown`` zone: nothing is inferred from it; the reading
that ends the gap leaves the zone before it only as the hysteresis allows.
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
    # The loop over :func:`thresholds`, unrolled (every tick; no tuple built): the last zone whose
    # lower bound the temperature reaches, checked coolest first.
    zone = ThermalZone.OPTIMAL
    if temperature_c >= policy.warning_c:
        zone = ThermalZone.WARNING
    if temperature_c >= policy.hot_c:
        zone = ThermalZone.HOT
    if temperature_c >= policy.throttle_c:
        zone = ThermalZone.THROTTLE
    if temperature_c >= policy.critical_c:
        zone = ThermalZone.CRITICAL
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
    reading: GpuReading,
    policy: ThermalPolicy,
    previous: ThermalZone,
    t_s: float,
    *,
    last_known: ThermalZone = ThermalZone.UNKNOWN,
) -> tuple[ThermalZone, Decision | None]:
    """New zone for ``reading`` and a ``thermal_zone`` decision when it changed.

    ``last_known``: the zone before the temperature went missing, when ``previous`` is unknown; the
    reading that ends the gap leaves it only as the hysteresis allows (a gap of a tick does not turn a
    critical card at 93 C into a throttling one)."""
    basis = last_known if previous is ThermalZone.UNKNOWN else previous
    zone = next_zone(reading.temperature_c, policy, basis)
    if zone is previous:
        return zone, None
    threshold: float | None = None
    temperature = reading.temperature_c
    bounds = dict(thresholds(policy))
    if zone is ThermalZone.UNKNOWN:
        reason = "temperature reading missing"
    elif zone is basis and zone is not ThermalZone.OPTIMAL:  # back from a gap, held by the hysteresis
        threshold = bounds[zone] - policy.hysteresis_c
        reason = f"temperature {temperature:g} C not below {threshold:g} C (threshold - hysteresis): still {zone}"
    elif basis is ThermalZone.UNKNOWN or zone.severity >= basis.severity:
        threshold = bounds.get(zone)
        if threshold is None:
            reason = f"temperature {temperature:g} C below every zone threshold"
        else:
            reason = f"temperature {temperature:g} C >= {threshold:g} C"
    else:
        threshold = bounds[basis] - policy.hysteresis_c
        reason = f"temperature {temperature:g} C < {threshold:g} C (threshold - hysteresis)"
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
