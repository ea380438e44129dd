"""The power ladder's anti-flap backoff: a quick step down after a step up lengthens the next dwell."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from governor.config import ConfigError, PowerPolicy, parse_config
from governor.model import Action, Decision, ThermalZone
from governor.rules.power import LadderState, backoff_level, effective_dwell_s, step_power
from tests.helpers import CARD_200W, reading

POLICY = PowerPolicy()  # 200/180 W, down at 75 C x3, up at 65 C after 60 s, flap window 900 s, cap 1800 s


class Card:
    """Feeds one temperature per second through step_power on a 200 W card that enforces every set."""

    def __init__(self, policy: PowerPolicy = POLICY) -> None:
        self.policy = policy
        self.state = LadderState()
        self.enforced_w = 200.0
        self.t_s = 0.0
        self.changes: list[Decision] = []

    def hold(self, temperature_c: float, seconds: int) -> None:
        """``seconds`` readings at ``temperature_c``, one per second."""
        for _ in range(seconds):
            self.state, out = step_power(
                reading(temperature_c, self.enforced_w, CARD_200W),
                ThermalZone.WARNING,
                ThermalZone.WARNING,
                self.policy,
                (200.0, 180.0),
                self.state,
                self.t_s,
            )
            for d in out:
                if d.action is Action.SET_POWER_LIMIT:
                    assert isinstance(d.to_value, float)
                    self.enforced_w = d.to_value
                    self.changes.append(d)
            self.t_s += 1.0

    def cycle(self, hot_s: int = 600, cool_s: int = 300) -> None:
        """One load cycle: hot (80 C) then cool (60 C)."""
        self.hold(80.0, hot_s)
        self.hold(60.0, cool_s)

    def ups(self) -> list[float]:
        """Times of every step up."""
        return [d.t_s for d in self.changes if d.rule == "power_step_up"]


class TestBackoff:
    def test_first_cycle_keeps_the_plain_dwell(self) -> None:
        """With no earlier step up there is no flap: the first step up comes after exactly dwell_s of cool."""
        card = Card()
        card.cycle()
        assert [(d.rule, d.t_s) for d in card.changes] == [("power_step_down", 2.0), ("power_step_up", 660.0)]
        assert "(dwell 60 s)" in card.changes[1].reason

    def test_quick_step_down_doubles_the_next_dwell(self) -> None:
        """A step down 42 s after a step up is a flap: the next step up needs 120 s of cool (doubled once, longer
        than the 42 s the release lasted); a second flap 182 s after that step up doubles it again, to 240 s."""
        card = Card()
        card.cycle(hot_s=600, cool_s=100)  # up at 660, hot again at 700: down at 702
        card.cycle()
        card.cycle()
        down_2 = card.changes[2]
        assert down_2.rule == "power_step_down" and "42 s after the last step up" in down_2.reason
        assert "next step up after 120 s of cool" in down_2.reason
        assert card.ups() == [660.0, 700 + 600 + 120.0, 1600 + 600 + 240.0]
        assert "dwell 120 s: 60 s backed off after flapping" in card.changes[3].reason

    def test_backoff_outlasts_the_release(self) -> None:
        """A step down 242 s after a step up doubles the dwell until it is longer than those 242 s (480 s), so
        the seed's 300 s quiet phase (280 s of cool) no longer releases: three changes in the first hour."""
        card = Card()
        for _ in range(4):
            card.cycle()
        down_2 = card.changes[2]
        assert "242 s after the last step up: next step up after 480 s of cool" in down_2.reason
        assert [(d.rule, d.t_s) for d in card.changes] == [
            ("power_step_down", 2.0),
            ("power_step_up", 660.0),
            ("power_step_down", 902.0),
        ]
        assert card.enforced_w == 180.0

    def test_settles_on_the_lower_rung(self) -> None:
        """Once the backed-off dwell (480 s) exceeds the cool phase the card stays at 180 W, until an hour's calm
        halves the dwell to 240 s and one step up is tried again (and undone by the next load)."""
        card = Card()
        for _ in range(5):
            card.cycle()
        assert len(card.changes) == 3  # down, up, down at 902 s; then calm
        assert card.enforced_w == 180.0
        card.cycle()  # 4500-5400: more than an hour after the last change at 902 s
        ups = [d for d in card.changes if d.rule == "power_step_up"]
        assert ups[-1].t_s == 5100 + 240.0 and "dwell 240 s" in ups[-1].reason

    def test_dwell_capped_at_dwell_max(self) -> None:
        """However often it flaps, the dwell never exceeds dwell_max_s."""
        policy = replace(POLICY, dwell_max_s=200.0, backoff_decay_s=86400.0)
        state = LadderState(rung=1, last_change_s=0.0, last_up_s=-10.0, backoff=0)
        for _ in range(10):
            state = replace(state, backoff=min(state.backoff + 1, 10))
        assert effective_dwell_s(policy, state, 1.0) == 200.0

    def test_backoff_decays_after_calm(self) -> None:
        """Each backoff_decay_s without a change halves the dwell: 480 s -> 240 s -> 120 s -> 60 s."""
        state = LadderState(rung=1, last_change_s=0.0, backoff=3)
        dwells = [effective_dwell_s(POLICY, state, t) for t in (0.0, 3600.0, 7200.0, 10800.0, 99999.0)]
        assert dwells == [480.0, 240.0, 120.0, 60.0, 60.0]
        assert backoff_level(POLICY, state, 3599.0) == 3

    def test_slow_return_is_no_flap(self) -> None:
        """A step down more than flap_window_s after the step up keeps the plain dwell."""
        card = Card()
        card.cycle(hot_s=600, cool_s=1000)  # step up at 660, next heat at 1600: 940 s > 900 s
        card.cycle()
        assert card.ups() == [660.0, 1600 + 600 + 60.0]

    def test_window_zero_turns_backoff_off(self) -> None:
        """flap_window_s = 0 gives the plain ladder: every cycle steps down and back up after dwell_s."""
        card = Card(replace(POLICY, flap_window_s=0.0))
        for _ in range(4):
            card.cycle()
        assert card.ups() == [660.0 + 900.0 * k for k in range(4)]

    def test_min_change_interval_still_holds(self) -> None:
        """With backoff, no two changes are ever closer than min_change_interval_s."""
        card = Card(replace(POLICY, min_change_interval_s=45.0))
        for _ in range(6):
            card.cycle(hot_s=100, cool_s=70)
        times = [d.t_s for d in card.changes]
        assert len(times) >= 3
        assert all(b - a >= 45.0 for a, b in itertools.pairwise(times))


class TestBackoffConfig:
    def test_keys_are_read(self) -> None:
        """The three backoff keys are read from [power] as floats."""
        config = parse_config({"power": {"flap_window_s": 0, "dwell_max_s": 600, "backoff_decay_s": 120}}, "f")
        assert (config.power.flap_window_s, config.power.dwell_max_s, config.power.backoff_decay_s) == (
            0.0,
            600.0,
            120.0,
        )

    @pytest.mark.parametrize(
        ("key", "value"), [("flap_window_s", -1.0), ("dwell_max_s", 1e9), ("backoff_decay_s", 0.0)]
    )
    def test_out_of_range_rejected(self, key: str, value: float) -> None:
        """A negative window, an absurd cap or a zero decay period is a config error naming the key."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"power": {key: value}}, "f")
        assert [issue.key for issue in caught.value.issues] == [f"power.{key}"]
