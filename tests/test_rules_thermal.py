"""The thermal zone state machine: boundaries, hysteresis, missing readings, decisions."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from governor.config import ThermalPolicy
from governor.model import Action, ThermalZone
from governor.rules.thermal import evaluate_zone, next_zone, raw_zone, thresholds
from tests.helpers import reading

Z = ThermalZone
POLICY = ThermalPolicy()


def walk(temperatures: Iterable[float | None], start: ThermalZone = Z.UNKNOWN) -> list[ThermalZone]:
    """The zone after each temperature of a series, starting from ``start``."""
    zone = start
    zones = []
    for t in temperatures:
        zone = next_zone(t, POLICY, zone)
        zones.append(zone)
    return zones


class TestRawZone:
    """raw_zone: the band a temperature falls in, without hysteresis."""

    @pytest.mark.parametrize(
        ("temperature", "zone"),
        [
            (-10.0, Z.OPTIMAL),
            (69.99, Z.OPTIMAL),
            (70.0, Z.WARNING),
            (79.99, Z.WARNING),
            (80.0, Z.HOT),
            (84.99, Z.HOT),
            (85.0, Z.THROTTLE),
            (94.99, Z.THROTTLE),
            (95.0, Z.CRITICAL),
            (130.0, Z.CRITICAL),
        ],
    )
    def test_default_boundaries(self, temperature: float, zone: ThermalZone) -> None:
        """Each default threshold (70/80/85/95 C) is entered at >=, and just below it is the zone beneath."""
        assert raw_zone(temperature, POLICY) is zone

    def test_zero_is_a_real_reading(self) -> None:
        """0 C is a (cool) reading, not a missing one."""
        assert raw_zone(0.0, POLICY) is Z.OPTIMAL

    def test_thresholds_coolest_first(self) -> None:
        """thresholds() lists the zone lower bounds from warning to critical."""
        assert thresholds(POLICY) == (
            (Z.WARNING, 70.0),
            (Z.HOT, 80.0),
            (Z.THROTTLE, 85.0),
            (Z.CRITICAL, 95.0),
        )


class TestNextZone:
    """next_zone: rising is immediate, falling needs hysteresis."""

    def test_rising_is_immediate(self) -> None:
        """From optimal, a reading at a threshold enters that zone at once, skipping zones between."""
        assert next_zone(80.0, POLICY, Z.OPTIMAL) is Z.HOT
        assert next_zone(95.0, POLICY, Z.OPTIMAL) is Z.CRITICAL

    def test_first_reading_takes_its_raw_zone(self) -> None:
        """From unknown, the zone is the raw zone of the reading, even a cool one."""
        assert next_zone(50.0, POLICY, Z.UNKNOWN) is Z.OPTIMAL
        assert next_zone(82.0, POLICY, Z.UNKNOWN) is Z.HOT

    @pytest.mark.parametrize(("temperature", "zone"), [(79.9, Z.HOT), (77.0, Z.HOT), (76.99, Z.WARNING)])
    def test_leaving_needs_threshold_minus_hysteresis(self, temperature: float, zone: ThermalZone) -> None:
        """Hot (80 C) is left only below 77 C (80 - 3); at exactly 77 C it holds."""
        assert next_zone(temperature, POLICY, Z.HOT) is zone

    def test_falling_far_lands_in_matching_zone(self) -> None:
        """From critical, a drop to 60 C lands straight in optimal."""
        assert next_zone(60.0, POLICY, Z.CRITICAL) is Z.OPTIMAL

    def test_falling_lands_by_temperature_plus_hysteresis(self) -> None:
        """From critical, 81.5 C lands in hot, since 84.5 C is below throttle but above hot."""
        assert next_zone(81.5, POLICY, Z.CRITICAL) is Z.HOT

    def test_missing_reading_is_unknown(self) -> None:
        """A missing temperature gives unknown from any zone."""
        for zone in Z:
            assert next_zone(None, POLICY, zone) is Z.UNKNOWN

    def test_wobble_around_threshold_does_not_flap(self) -> None:
        """A reading wobbling 79-81 C around the 80 C threshold enters hot once and stays."""
        zones = walk([75.0, 80.0, 79.0, 80.5, 78.0, 81.0, 77.5, 79.9], start=Z.OPTIMAL)
        assert zones == [Z.WARNING] + [Z.HOT] * 7

    def test_wobble_after_leaving_does_not_reenter(self) -> None:
        """Once hot is left at < 77 C, readings up to 79.9 C stay in warning."""
        zones = walk([81.0, 76.0, 79.9, 78.0, 79.5], start=Z.OPTIMAL)
        assert zones == [Z.HOT, Z.WARNING, Z.WARNING, Z.WARNING, Z.WARNING]

    def test_zero_hysteresis(self) -> None:
        """With hysteresis 0, a zone is left as soon as the reading is below its threshold."""
        policy = ThermalPolicy(hysteresis_c=0.0)
        assert next_zone(79.99, policy, Z.HOT) is Z.WARNING
        assert next_zone(80.0, policy, Z.HOT) is Z.HOT


class TestEvaluateZone:
    """evaluate_zone: the thermal_zone decision and its reason fields."""

    def test_no_decision_without_change(self) -> None:
        """A reading that keeps the zone gives no decision."""
        zone, decision = evaluate_zone(reading(82.0), POLICY, Z.HOT, t_s=5.0)
        assert zone is Z.HOT
        assert decision is None

    def test_rising_decision_fields(self) -> None:
        """Entering hot names the rule, reading, entry threshold, from and to zones, and the time."""
        r = reading(81.0)
        zone, decision = evaluate_zone(r, POLICY, Z.WARNING, t_s=12.5)
        assert zone is Z.HOT
        assert decision is not None
        assert decision.rule == "thermal_zone"
        assert decision.action is Action.NONE
        assert (decision.reading, decision.threshold) == (81.0, 80.0)
        assert (decision.from_value, decision.to_value) == ("warning", "hot")
        assert (decision.t_s, decision.gpu_index, decision.gpu_uuid) == (12.5, r.index, r.uuid)
        assert ">= 80 C" in decision.reason

    def test_falling_decision_threshold_is_exit_point(self) -> None:
        """Leaving hot reports the exit point (threshold - hysteresis = 77 C) as threshold."""
        zone, decision = evaluate_zone(reading(76.0), POLICY, Z.HOT, t_s=1.0)
        assert zone is Z.WARNING
        assert decision is not None
        assert decision.threshold == 77.0
        assert (decision.from_value, decision.to_value) == ("hot", "warning")
        assert "< 77 C" in decision.reason

    def test_missing_reading_decision(self) -> None:
        """A missing reading from a known zone reports the change to unknown with no reading or threshold."""
        zone, decision = evaluate_zone(reading(None), POLICY, Z.WARNING, t_s=1.0)
        assert zone is Z.UNKNOWN
        assert decision is not None
        assert (decision.reading, decision.threshold) == (None, None)
        assert (decision.from_value, decision.to_value) == ("warning", "unknown")
        assert "missing" in decision.reason

    def test_missing_reading_twice_reports_once(self) -> None:
        """A second missing reading in a row gives no further decision."""
        _, decision = evaluate_zone(reading(None), POLICY, Z.UNKNOWN, t_s=2.0)
        assert decision is None

    def test_first_reading_optimal(self) -> None:
        """The first cool reading reports unknown -> optimal with no threshold."""
        zone, decision = evaluate_zone(reading(40.0), POLICY, Z.UNKNOWN, t_s=0.0)
        assert zone is Z.OPTIMAL
        assert decision is not None
        assert decision.threshold is None
        assert (decision.from_value, decision.to_value) == ("unknown", "optimal")

    def test_first_reading_hot_uses_entry_threshold(self) -> None:
        """A first reading already in throttle reports the throttle entry threshold."""
        zone, decision = evaluate_zone(reading(86.0), POLICY, Z.UNKNOWN, t_s=0.0)
        assert zone is Z.THROTTLE
        assert decision is not None
        assert decision.threshold == 85.0

    def test_noisy_series_changes_zone_only_at_real_crossings(self) -> None:
        """A noisy series around 70 C gives one decision in and one out, not one per crossing."""
        series = [65.0, 70.2, 69.5, 70.1, 68.0, 69.9, 66.9, 68.5, 69.8]
        zone = Z.OPTIMAL
        changes = []
        for i, t in enumerate(series):
            zone, decision = evaluate_zone(reading(t), POLICY, zone, t_s=float(i))
            if decision is not None:
                changes.append((decision.from_value, decision.to_value))
        assert changes == [("optimal", "warning"), ("warning", "optimal")]
