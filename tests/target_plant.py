"""A closed loop for target-mode tests: step_target driving a two-node thermal plant.

The plant is the simulator's thermal model (governor.sim.thermal) with a card whose draw
is ``min(demand, limit)``; readings are whole degrees, as NVML's. Every limit the
controller sets is enforced at once (unless ``enforce`` is off, as in dry run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from governor.model import Action, Decision, GpuInfo, GpuReading
from governor.policy import PowerPolicy, ThermalZone
from governor.rules.target import TargetState, step_target, target_bounds
from governor.sim.thermal import ThermalParams, ThermalState

RTX4070 = ThermalParams(r_die_c_per_w=0.06, c_die_j_per_c=25.0, r_sink_c_per_w=0.20, c_sink_j_per_c=300.0)
"""The rtx4070 profile's thermal constants: 0.26 C/W in all, heatsink time constant 60 s."""
CARD = GpuInfo(
    index=0,
    uuid="GPU-target",
    name="NVIDIA GeForce RTX 4070",
    power_limit_min_w=100.0,
    power_limit_max_w=220.0,
    power_limit_default_w=200.0,
)
TARGET = PowerPolicy(mode="target", target_c=75.0)


@dataclass
class Loop:
    """One card under the controller, one reading per second."""

    policy: PowerPolicy = TARGET
    gpu: GpuInfo = CARD
    params: ThermalParams = RTX4070
    room_c: float = 30.0
    demand_w: float = 210.0
    enforce: bool = True
    limit_w: float = 200.0
    t_s: float = 0.0
    state: TargetState = field(default_factory=TargetState)
    changes: list[Decision] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    temperatures_c: list[float] = field(default_factory=list)
    zone: ThermalZone = ThermalZone.OPTIMAL
    missing: Callable[[float], str | None] = lambda _t: None
    start_w: float = 12.0
    plant: ThermalState | None = None

    def __post_init__(self) -> None:
        if self.plant is None:  # settled at start_w (idle by default) before the load starts
            self.plant = ThermalState.at_steady_state(self.params, 1.0, self.start_w, self.room_c)

    @property
    def bounds(self) -> tuple[float, ...]:
        """(ceiling, floor) of the card under the policy."""
        return target_bounds(self.policy, self.gpu)

    def run(self, seconds: int, zone: ThermalZone | None = None) -> None:
        """``seconds`` ticks: the plant steps at the card's draw, then the controller reads it."""
        assert self.plant is not None
        for _ in range(seconds):
            power = max(12.0, min(self.demand_w, self.limit_w)) if self.demand_w > 0 else 12.0
            die = self.plant.step(power, self.room_c)
            self.temperatures_c.append(die)
            self.t_s += 1.0
            gone = self.missing(self.t_s)
            reading = GpuReading(
                index=self.gpu.index,
                uuid=self.gpu.uuid,
                temperature_c=None if gone == "temperature" else float(round(die)),
                power_w=None if gone == "power" else power,
                power_limit_w=self.limit_w,
                clock_event_reasons=0x4 if self.demand_w > self.limit_w else 0,
            )
            now = zone if zone is not None else ThermalZone.OPTIMAL
            self.state, out = step_target(
                reading, self.zone, now, self.policy, self.bounds, self.state, self.t_s, check_drift=self.enforce
            )
            self.zone = now
            self.decisions.extend(out)
            for d in out:
                if d.action is Action.SET_POWER_LIMIT and d.to_w is not None:
                    self.changes.append(d)
                    if self.enforce:
                        self.limit_w = d.to_w

    def changes_between(self, start_s: float, end_s: float) -> list[Decision]:
        """The limit changes decided in ``[start_s, end_s)``."""
        return [d for d in self.changes if start_s <= d.t_s < end_s]

    def with_policy(self, **changes: object) -> Loop:
        """This loop's settings with the policy changed (a fresh controller)."""
        return Loop(policy=replace(self.policy, **changes), room_c=self.room_c, demand_w=self.demand_w)  # type: ignore[arg-type]
