"""A GPU whose allowed power-limit range leaves the ladder one limit is named at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from governor.clock import VirtualClock
from governor.config import Config
from governor.messages import message
from governor.policy import PowerPolicy
from tests.builders import build_daemon
from tests.scripted import ScriptedBackend


def started_events(tmp_path: Path, min_w: float, max_w: float, limit_w: float, **config: Any) -> list[dict[str, Any]]:
    """The events a daemon logs at start on one scripted GPU with this range and limit (W)."""
    clock = VirtualClock()
    backend = ScriptedBackend(clock, lambda t, i: 50.0, limit_w=limit_w, min_w=min_w, max_w=max_w)
    daemon = build_daemon(Config(state_dir=str(tmp_path), **config), backend, clock)
    with capture_logs() as logs:
        daemon.start()
    daemon.stop()
    return [dict(e) for e in logs]


def test_a_fixed_range_is_named_once_at_start(tmp_path: Path) -> None:
    """A card that allows only 150 W gets one warning naming its range and what still applies."""
    events = started_events(tmp_path, 150.0, 150.0, 150.0)
    (inert,) = [e for e in events if e["event"] == "power_ladder_inert"]
    assert inert["log_level"] == "warning"
    assert inert["limit_w"] == 150.0 and inert["power_limit_range_w"] == "150.0-150.0"
    assert "cannot be lowered" in str(inert["effect"])
    assert message("power_ladder_inert", inert) == (
        "GPU 0 power limit stays at 150 W: its allowed range is 150.0-150.0 W, so no rung of the ladder is lower"
    )


def test_a_range_with_room_is_not_named(tmp_path: Path) -> None:
    """The seed's card (100-220 W, 200 W) has a ladder with room: no warning."""
    assert not [e for e in started_events(tmp_path, 100.0, 220.0, 200.0) if e["event"] == "power_ladder_inert"]


def test_a_card_with_the_power_rule_off_is_not_named(tmp_path: Path) -> None:
    """With the power rule off the range does not matter: no warning."""
    events = started_events(tmp_path, 150.0, 150.0, 150.0, power=PowerPolicy(enabled=False))
    assert not [e for e in events if e["event"] == "power_ladder_inert"]
