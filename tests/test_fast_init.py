"""governor.model.fast_init: the faster constructor of the per-tick frozen values changes nothing else."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from governor.core import TICK, GpuTick, TickReport
from governor.model import FanStatus, GpuHealth, GpuReading, Snapshot, constructor, fast_init


def _reading(**changes: object) -> GpuReading:
    return GpuReading(index=1, uuid="GPU-a", temperature_c=61.5, power_w=210.0, **changes)  # type: ignore[arg-type]


def test_values_are_their_class_and_frozen() -> None:
    """A fast-built reading is a GpuReading whose fields cannot be assigned or deleted."""
    reading = _reading()
    assert type(reading) is GpuReading
    with pytest.raises(dataclasses.FrozenInstanceError):
        reading.temperature_c = 20.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del reading.uuid
    assert not hasattr(reading, "__dict__")


def test_defaults_fields_replace_and_equality_are_the_dataclass_ones() -> None:
    """Defaults apply, fields() lists every field, replace() builds an equal-by-value copy, hashes match."""
    reading = _reading()
    assert reading.health is GpuHealth.OK and reading.processes is None and reading.telemetry is None
    assert [f.name for f in dataclasses.fields(reading)][:3] == ["index", "uuid", "temperature_c"]
    moved = dataclasses.replace(reading, temperature_c=70.0)
    assert moved.temperature_c == 70.0 and moved.power_w == 210.0 and moved != reading
    assert dataclasses.replace(moved, temperature_c=61.5) == reading
    assert hash(dataclasses.replace(moved, temperature_c=61.5)) == hash(reading)
    assert copy.deepcopy(reading) == reading and pickle.loads(pickle.dumps(reading)) == reading
    assert repr(reading).startswith("GpuReading(index=1, uuid='GPU-a', temperature_c=61.5")


def test_default_factories_give_a_fresh_value_each_time() -> None:
    """A field with a default factory gets a new value per instance, and a given value is kept."""
    snapshot = Snapshot(t_s=1.0, wall_time_s=2.0, gpus=(_reading(),))
    first = TickReport(kind=TICK, config=None, snapshot=snapshot, wall_s=2.0, results=())  # type: ignore[arg-type]
    second = TickReport(kind=TICK, config=None, snapshot=snapshot, wall_s=2.0, results=())  # type: ignore[arg-type]
    assert first.facts == {} and first.facts is not second.facts
    given = {"GPU-a": "why"}
    assert TickReport(TICK, None, None, 0.0, (), hands_off=given).hands_off is given  # type: ignore[arg-type]
    tick_fields = {f.name: f for f in dataclasses.fields(GpuTick)}
    assert tick_fields["fan"].default_factory is FanStatus


def test_missing_argument_is_refused_like_the_dataclass() -> None:
    """A required field left out raises TypeError, as the dataclass's own constructor does."""
    with pytest.raises(TypeError):
        GpuReading(index=1)  # type: ignore[call-arg]


def test_refuses_classes_it_does_not_fit() -> None:
    """A mutable dataclass, a dict-based frozen one and one with __post_init__ are refused."""

    @dataclasses.dataclass(slots=True)
    class Mutable:
        x: int

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        x: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class PostInit:
        x: int

        def __post_init__(self) -> None:
            pass

    for cls in (Mutable, NoSlots, PostInit):
        with pytest.raises(TypeError, match="fast_init"):
            fast_init(cls)


class TestConstructor:
    """governor.model.constructor: a keyword-friendly function that builds the same values as the class."""

    def test_builds_what_the_class_builds(self) -> None:
        """Every field given by keyword lands where the class's own constructor puts it; defaults apply."""
        new = constructor(GpuReading)
        fields = {
            f.name: f"value-{i}" if f.name != "health" else GpuHealth.LOST
            for i, f in enumerate(dataclasses.fields(GpuReading))
        }
        built = new(**fields)  # type: ignore[arg-type]
        assert type(built) is GpuReading and built == GpuReading(**fields)  # type: ignore[arg-type]
        assert new(index=1, uuid="GPU-a", temperature_c=61.5, power_w=210.0) == _reading()

    def test_default_factories_and_missing_arguments(self) -> None:
        """A factory default is fresh per value (fast_init's marker passes through); a missing field raises."""
        new = constructor(TickReport)
        first = new(kind=TICK, config=None, snapshot=None, wall_s=0.0, results=())  # type: ignore[arg-type]
        second = new(kind=TICK, config=None, snapshot=None, wall_s=0.0, results=())  # type: ignore[arg-type]
        assert first.facts == {} and first.facts is not second.facts
        with pytest.raises(TypeError):
            new(kind=TICK)  # type: ignore[call-arg]

    def test_refuses_an_init_it_cannot_forward(self) -> None:
        """A keyword-only or catch-all __init__, and a class whose __init__ is not Python, are refused."""

        @dataclasses.dataclass(kw_only=True)
        class KeywordOnly:
            x: int

        class Catchall:
            def __init__(self, *args: int, **kwargs: int) -> None:
                pass

        for cls in (KeywordOnly, Catchall, int):
            with pytest.raises(TypeError, match="constructor"):
                constructor(cls)
