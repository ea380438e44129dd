"""A GPU's power-limit range and default limit read again at runtime by the NVML adapter.

The adapter reads them at open and again every ``telemetry_refresh_s`` (10 s), and at the next tick
after NVML refused a limit as an invalid argument; a failure that may pass keeps the last values,
NotSupported is None, a nonsense range is refused (the last good one stays). The core follows the
adapter's GPUs, so the rules clamp to a range that moved and the metrics show it.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from governor.backends import SetLimitFailed
from governor.backends.nvml import NvmlBackend
from governor.clock import VirtualClock
from governor.config import Config, parse_config, parse_toml
from governor.core import Governor, open_originals
from governor.metrics import build_registry
from governor.model import GpuHealth, Outcome, checked_power_range, refreshed_power_range
from tests.builders import build_daemon, step_ticks
from tests.fake_pynvml import (
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_NO_DATA,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    FakeGpu,
    FakeNvml,
)

UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
CONSTRAINTS = "nvmlDeviceGetPowerManagementLimitConstraints"
DEFAULT = "nvmlDeviceGetPowerManagementDefaultLimit"
SHIPPED = Path(__file__).resolve().parents[1] / "config" / "governor.toml"
H100 = (200.0, 700.0, 700.0)  # FakeGpu's range and default, W


def opened(card: FakeGpu, **kwargs: Any) -> tuple[NvmlBackend, FakeNvml, VirtualClock]:
    """The NVML adapter over one fake ``card``, on a virtual clock at 0 s."""
    clock = VirtualClock()
    fake = FakeNvml([card])
    return NvmlBackend(clock, nvml=fake, **kwargs), fake, clock


def ticks(backend: NvmlBackend, clock: VirtualClock, count: int) -> None:
    """``count`` reads one second apart."""
    for _ in range(count):
        clock.advance(1.0)
        backend.read()


def power_range(backend: NvmlBackend) -> tuple[float | None, float | None, float | None]:
    """The (min, max, default) W the adapter hands out for its one GPU."""
    (info,) = backend.gpus()
    return info.power_limit_min_w, info.power_limit_max_w, info.power_limit_default_w


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    """The captured log entries of event ``name``."""
    return [e for e in logs if e["event"] == name]


def set_range(card: FakeGpu, min_mw: int, max_mw: int, default_mw: int) -> None:
    """Give ``card`` a new range and default (mW), as NVML would report them from now on."""
    card.limit_min_mw, card.limit_max_mw, card.limit_default_mw = min_mw, max_mw, default_mw


class TestReadAgain:
    def test_a_changed_range_is_read_after_the_cadence_and_logged_once(self) -> None:
        """A range and default changed on the card are handed out at the next 10 s range read, not before,
        and logged once with the GPU's UUID and the old and new values."""
        card = FakeGpu(uuid=UUID0)
        backend, _, clock = opened(card)
        set_range(card, 250_000, 600_000, 600_000)
        with capture_logs() as logs:
            ticks(backend, clock, 9)
            assert power_range(backend) == H100
            ticks(backend, clock, 1)
            assert power_range(backend) == (250.0, 600.0, 600.0)
            ticks(backend, clock, 20)
        (change,) = events(logs, "nvml_power_range_changed")
        assert change["uuid"] == UUID0
        assert (change["old_min_w"], change["old_max_w"], change["old_default_w"]) == H100
        assert (change["min_w"], change["max_w"], change["default_w"]) == (250.0, 600.0, 600.0)

    def test_a_changed_default_alone_is_read(self) -> None:
        """A default limit that changes under the same range (a VBIOS or driver reload) is handed out."""
        card = FakeGpu(uuid=UUID0)
        backend, _, clock = opened(card)
        card.limit_default_mw = 650_000
        ticks(backend, clock, 10)
        assert power_range(backend) == (200.0, 700.0, 650.0)

    @pytest.mark.parametrize("code", [NVML_ERROR_TIMEOUT, NVML_ERROR_NO_DATA, NVML_ERROR_NO_PERMISSION])
    def test_a_failure_that_may_pass_keeps_the_last_range(self, code: int) -> None:
        """While the range and default reads fail (timeout, no data, no permission) the last values stay; the
        next read that passes brings the card's new ones."""
        card = FakeGpu(uuid=UUID0)
        backend, _, clock = opened(card)
        set_range(card, 250_000, 600_000, 600_000)
        card.errors.update({CONSTRAINTS: code, DEFAULT: code})
        ticks(backend, clock, 25)
        assert power_range(backend) == H100
        card.errors.clear()
        ticks(backend, clock, 5)
        assert power_range(backend) == (250.0, 600.0, 600.0)

    def test_not_supported_is_none_and_asked_again_after_its_rest(self) -> None:
        """A range and default that turn NotSupported are None (the GPU is then monitor-only) and are asked
        again after unsupported_reprobe_s, then handed out once the card answers."""
        card = FakeGpu(uuid=UUID0)
        backend, fake, clock = opened(card, unsupported_reprobe_s=60.0)
        card.errors.update({CONSTRAINTS: NVML_ERROR_NOT_SUPPORTED, DEFAULT: NVML_ERROR_NOT_SUPPORTED})
        ticks(backend, clock, 10)
        assert power_range(backend) == (None, None, None)
        card.errors.clear()
        ticks(backend, clock, 59)
        assert power_range(backend) == (None, None, None)
        assert fake.calls[CONSTRAINTS] == 2  # at open and at 10 s: resting since
        ticks(backend, clock, 1)
        assert power_range(backend) == H100

    def test_a_gpu_lost_while_its_range_is_read_reads_lost(self) -> None:
        """GPU_IS_LOST on the range read makes the GPU read LOST; once reacquired its range is read again."""
        card = FakeGpu(uuid=UUID0)
        backend, fake, clock = opened(card)
        card.errors[CONSTRAINTS] = NVML_ERROR_GPU_IS_LOST
        ticks(backend, clock, 9)
        clock.advance(1.0)
        assert backend.read().gpus[0].health is GpuHealth.LOST
        del card.errors[CONSTRAINTS]
        set_range(card, 200_000, 600_000, 600_000)  # reset to a new board power
        clock.advance(1.0)  # the first retry is 1 s later
        assert backend.read().gpus[0].health is GpuHealth.OK
        assert power_range(backend) == (200.0, 600.0, 600.0)
        assert fake.calls[CONSTRAINTS] == 3  # at open, when lost, once back

    def test_a_limit_refused_as_invalid_reads_the_range_at_the_next_tick(self) -> None:
        """A set NVML refuses as an invalid argument (the card's range narrowed under the governor) has the
        range read at the next tick, not 10 s later."""
        card = FakeGpu(uuid=UUID0)
        backend, _, clock = opened(card)
        ticks(backend, clock, 1)
        set_range(card, 200_000, 600_000, 600_000)
        with pytest.raises(SetLimitFailed, match="Invalid Argument"):
            backend.set_power_limit(UUID0, 650.0)
        ticks(backend, clock, 1)
        assert power_range(backend) == (200.0, 600.0, 600.0)

    def test_a_limit_that_failed_otherwise_waits_for_the_cadence(self) -> None:
        """A set failing with a timeout says nothing about the range: it is read at its 10 s cadence only."""
        card = FakeGpu(uuid=UUID0, errors={"nvmlDeviceSetPowerManagementLimit": NVML_ERROR_TIMEOUT})
        backend, fake, clock = opened(card)
        ticks(backend, clock, 1)
        with pytest.raises(SetLimitFailed):
            backend.set_power_limit(UUID0, 650.0)
        ticks(backend, clock, 1)
        assert fake.calls[CONSTRAINTS] == 1


NONSENSE = [
    pytest.param((700_000, 200_000, 700_000), "power limit range 700.0-200.0 W", id="min-over-max"),
    pytest.param((0, 700_000, 700_000), "power limit range 0.0-700.0 W", id="zero-min"),
    pytest.param((200_000, 0xFFFFFFFF, 700_000), "power limit range 200.0-4294967.295 W", id="all-ones-max"),
    pytest.param((200_000, 2_900_000, 700_000), "over 4x the default 700.0 W", id="max-over-4x-default"),
]


class TestNonsense:
    @pytest.mark.parametrize(("raw", "dropped"), NONSENSE)
    def test_a_nonsense_range_is_refused_and_logged_once(self, raw: tuple[int, int, int], dropped: str) -> None:
        """A range no card has, read at runtime, is refused: the last good range and default stay, one
        nvml_power_range_refused warning names it; a good range read afterwards is taken."""
        card = FakeGpu(uuid=UUID0)
        backend, _, clock = opened(card)
        set_range(card, *raw)
        with capture_logs() as logs:
            ticks(backend, clock, 35)
            assert power_range(backend) == H100
            set_range(card, 250_000, 600_000, 600_000)
            ticks(backend, clock, 10)
        (refused,) = events(logs, "nvml_power_range_refused")
        assert dropped in refused["dropped"] and refused["uuid"] == UUID0
        assert (refused["min_w"], refused["max_w"], refused["default_w"]) == H100
        assert events(logs, "nvml_power_range_changed")[0]["max_w"] == 600.0
        assert power_range(backend) == (250.0, 600.0, 600.0)

    def test_a_broken_default_keeps_the_last_one(self) -> None:
        """A default read outside the card's range is refused and the last default stays (it lies in the range)."""
        card = FakeGpu(uuid=UUID0)
        backend, _, clock = opened(card)
        card.limit_default_mw = 9_000_000
        with capture_logs() as logs:
            ticks(backend, clock, 10)
        assert power_range(backend) == H100
        assert [e["dropped"] for e in events(logs, "nvml_power_range_refused")] == ["default power limit 9000.0 W"]

    def test_a_card_broken_since_open_warns_once(self) -> None:
        """A card whose range was nonsense at open (no good range to keep) stays without one and is warned
        about once, not at every range read."""
        card = FakeGpu(uuid=UUID0, limit_min_mw=700_000, limit_max_mw=200_000)
        with capture_logs() as logs:
            backend, _, clock = opened(card)
            ticks(backend, clock, 35)
        assert power_range(backend) == (None, None, 700.0)
        assert len(events(logs, "nvml_value_implausible")) == 1
        assert events(logs, "nvml_power_range_refused") == []


class TestRefreshedPowerRange:
    def test_what_passes_is_used(self) -> None:
        """A sane range and default read again replace the last ones, nothing dropped or kept."""
        assert refreshed_power_range(H100, 250.0, 600.0, 600.0) == ((250.0, 600.0, 600.0), None, False)

    def test_a_refused_range_keeps_the_last_and_checks_the_default_against_it(self) -> None:
        """An inverted range keeps the last range; a new default inside it is used, one outside keeps the last."""
        assert refreshed_power_range(H100, 600.0, 250.0, 650.0)[:1] == ((200.0, 700.0, 650.0),)
        used, problem, kept = refreshed_power_range(H100, 600.0, 250.0, 9000.0)
        assert used == H100 and kept and problem is not None

    def test_without_a_last_range_it_is_the_check_at_open(self) -> None:
        """With nothing good to keep, the result is checked_power_range's, and nothing is kept."""
        used, problem, kept = refreshed_power_range((None, None, None), 700.0, 200.0, 700.0)
        assert (used, problem, kept) == ((None, None, 700.0), "power limit range 700.0-200.0 W", False)

    def test_a_maximum_over_four_times_the_default_is_no_range(self) -> None:
        """checked_power_range drops a range whose maximum is over 4x its default (the default stays); 4x is kept."""
        assert checked_power_range(100.0, 2900.0, 700.0)[:3] == (None, None, 700.0)
        assert checked_power_range(100.0, 2800.0, 700.0)[:3] == (100.0, 2800.0, 700.0)


def governed(tmp_path: Path, card: FakeGpu) -> tuple[Governor, VirtualClock]:
    """The shipped config's governor (not dry-run, state under ``tmp_path``) over the NVML adapter over ``card``."""
    clock = VirtualClock()
    doc = dict(parse_toml(SHIPPED.read_bytes(), str(SHIPPED)), state_dir=str(tmp_path / "state"), runtime_dir="")
    config = parse_config(dict(doc, dry_run=False), str(SHIPPED))
    return Governor(config, NvmlBackend(clock, nvml=FakeNvml([card])), open_originals(config)), clock


class TestGoverned:
    def test_the_rules_clamp_to_a_range_that_moved(self, tmp_path: Path) -> None:
        """A GPU capped at 630 W whose minimum rises to 650 W (the driver enforcing 650 W) has its one re-apply
        of 630 W refused as invalid, the range read at the next tick, and from then on a target clamped to
        650 W and no failed write."""
        card = FakeGpu(uuid=UUID0, temperature_c=80)
        governor, clock = governed(tmp_path, card)
        step_ticks(governor, clock, 33)  # at 30 s the range was read, the next read is due at 40 s
        assert card.enforced_limit_mw == 630_000
        card.limit_min_mw = card.enforced_limit_mw = card.requested_limit_mw = 650_000
        (failed,) = step_ticks(governor, clock, 1)
        assert failed.outcome is Outcome.FAILED and failed.decision.to_w == 630.0
        clock.advance(1.0)
        (gpu,) = governor.step(governor.read()).gpus
        assert governor.gpus[0].power_limit_min_w == 650.0 and gpu.target_w == 650.0
        assert [r for r in step_ticks(governor, clock, 30) if r.outcome is Outcome.FAILED] == []
        assert card.enforced_limit_mw == 650_000

    def test_the_metrics_show_the_new_range(self, tmp_path: Path) -> None:
        """The min/max/default gauges show a range changed at runtime once the adapter read it again."""
        clock = VirtualClock()
        card = FakeGpu(uuid=UUID0)
        daemon = build_daemon(
            Config(state_dir=str(tmp_path), runtime_dir=""), NvmlBackend(clock, nvml=FakeNvml([card])), clock
        )
        daemon.start()
        set_range(card, 250_000, 600_000, 600_000)
        for _ in range(11):
            clock.advance(1.0)
            daemon.tick()
        body = generate_latest(build_registry(lambda: daemon.published)).decode()
        labels = f'{{gpu="0",uuid="{UUID0}"}}'
        for name, value in (("min", 250.0), ("max", 600.0), ("default", 600.0)):
            assert f"gpu_governor_gpu_power_limit_{name}_watts{labels} {value}" in body
