"""GPUs the NVML adapter skipped at start or never saw there are picked up later.

A GPU whose handle or UUID read fails at start (a timeout, an unknown error, a GPU still
initialising) and a GPU that appears after start (hot-plug, a reset, a device count that grows)
are opened at the adapter's re-count, every ``limit_refresh_s`` (30 s), never on the ticks in
between; the core follows :meth:`NvmlBackend.gpus` and governs them. Every test drives the real
adapter over tests/fake_pynvml.py and, where it says so, the real governor built from the shipped
config, as the daemon builds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor.backends.nvml import NvmlBackend
from governor.clock import VirtualClock
from governor.config import parse_config, parse_toml
from governor.core import Governor, open_originals
from governor.model import GpuHealth, Outcome
from tests.builders import step_ticks
from tests.fake_pynvml import (
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNKNOWN,
    FakeGpu,
    FakeNvml,
    NVMLError,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "governor.toml"
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"
UUID2 = "GPU-22222222-2222-2222-2222-222222222222"
HANDLE = "nvmlDeviceGetHandleByIndex_v2"
UUID_READ = "nvmlDeviceGetUUID"
COUNT = "nvmlDeviceGetCount"
CADENCE_S = 30.0  # the adapter's default limit_refresh_s


def adapter(*gpus: FakeGpu, **kwargs: Any) -> tuple[NvmlBackend, FakeNvml, VirtualClock]:
    """The NVML adapter over a fake NVML with ``gpus``, on a virtual clock at 0 s."""
    fake = FakeNvml(gpus)
    clock = VirtualClock()
    return NvmlBackend(clock, nvml=fake, **kwargs), fake, clock


def tick_until(backend: NvmlBackend, clock: VirtualClock, t_s: float) -> None:
    """Read every second until the clock shows ``t_s``."""
    while clock.monotonic() < t_s:
        clock.advance(1.0)
        backend.read()


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    """The captured log entries of event ``name``."""
    return [e for e in logs if e["event"] == name]


class TestSkippedAtStart:
    @pytest.mark.parametrize(
        ("symbol", "code"),
        [
            (UUID_READ, NVML_ERROR_TIMEOUT),
            (UUID_READ, NVML_ERROR_UNKNOWN),
            (HANDLE, NVML_ERROR_TIMEOUT),
            (HANDLE, NVML_ERROR_GPU_IS_LOST),
        ],
    )
    def test_a_gpu_skipped_at_start_is_opened_at_the_recount(self, symbol: str, code: int) -> None:
        """A GPU whose handle or UUID read failed at start is opened, with its static facts, at the
        re-count 30 s later (not before), and is read from then on, in index order."""
        late = FakeGpu(uuid=UUID1, temperature_c=77, limit_min_mw=150_000, errors={symbol: code})
        with capture_logs() as logs:
            backend, _, clock = adapter(FakeGpu(uuid=UUID0), late)
            assert [g.uuid for g in backend.gpus()] == [UUID0]
            del late.errors[symbol]  # the GPU answers from now on
            tick_until(backend, clock, CADENCE_S - 1)
            assert [g.uuid for g in backend.gpus()] == [UUID0]
            tick_until(backend, clock, CADENCE_S)
        assert [(g.index, g.uuid) for g in backend.gpus()] == [(0, UUID0), (1, UUID1)]
        assert backend.gpus()[1].power_limit_min_w == 150.0  # the static facts, as at start
        snap = backend.read()
        assert [(r.index, r.health, r.temperature_c) for r in snap.gpus] == [
            (0, GpuHealth.OK, 40.0),
            (1, GpuHealth.OK, 77.0),
        ]
        assert [(e["gpu"], e["uuid"]) for e in events(logs, "nvml_gpu_found")] == [(1, UUID1)]

    def test_an_index_that_keeps_failing_is_retried_at_the_cadence_with_one_warning(self) -> None:
        """A GPU whose UUID read keeps timing out is tried again at each re-count (every 30 s, never
        between) and warned about once, not once per try."""
        with capture_logs() as logs:
            backend, fake, clock = adapter(FakeGpu(uuid=UUID0), FakeGpu(uuid=UUID1, errors={UUID_READ: 10}))
            assert fake.calls[UUID_READ] == 2  # both GPUs at start
            for cadence in range(1, 6):
                tick_until(backend, clock, cadence * CADENCE_S - 1)
                assert fake.calls[UUID_READ] == 1 + cadence  # not yet tried this cadence
                tick_until(backend, clock, cadence * CADENCE_S)
                assert fake.calls[UUID_READ] == 2 + cadence  # only the missing GPU, once
        assert [e["gpu"] for e in events(logs, "nvml_gpu_skipped")] == [1]
        assert [g.uuid for g in backend.gpus()] == [UUID0]


class TestCountGrows:
    def test_a_gpu_that_appears_after_start_is_picked_up(self) -> None:
        """A device count that grows from 1 to 2 (hot-plug, a GPU back after a reset): the second GPU
        is opened at the next re-count and read from then on."""
        backend, fake, clock = adapter(FakeGpu(uuid=UUID0))
        tick_until(backend, clock, 5)
        fake.gpus.append(FakeGpu(uuid=UUID1, temperature_c=66))
        with capture_logs() as logs:
            tick_until(backend, clock, CADENCE_S)
        assert [(g.index, g.uuid) for g in backend.gpus()] == [(0, UUID0), (1, UUID1)]
        assert [r.temperature_c for r in backend.read().gpus] == [40.0, 66.0]
        assert [e["gpu"] for e in events(logs, "nvml_gpu_found")] == [1]

    def test_an_open_gpu_is_never_reopened_even_while_lost(self) -> None:
        """When the count grows only the new index is opened: a lost GPU already open stays with the
        lost/back-off logic (reacquired by UUID), and no open GPU's handle is asked by index again."""
        lost = FakeGpu(uuid=UUID1)
        backend, fake, clock = adapter(FakeGpu(uuid=UUID0), lost, lost_backoff_max_s=1000.0)
        lost.lost = True
        tick_until(backend, clock, 1)
        assert fake.calls[HANDLE] == 2
        fake.gpus.append(FakeGpu(uuid=UUID2))
        tick_until(backend, clock, CADENCE_S)
        assert fake.calls[HANDLE] == 3  # index 2 only
        assert [g.uuid for g in backend.gpus()] == [UUID0, UUID1, UUID2]
        assert [r.health for r in backend.read().gpus] == [GpuHealth.OK, GpuHealth.LOST, GpuHealth.OK]

    def test_a_repeated_uuid_appearing_later_is_refused(self) -> None:
        """A card appearing later with the UUID of a GPU already open is skipped (one warning, however
        many re-counts), so a limit meant for one is never written to the other."""
        first, repeat = FakeGpu(uuid=UUID0), FakeGpu(uuid=UUID0, temperature_c=90)
        backend, fake, clock = adapter(first)
        fake.gpus.append(repeat)
        with capture_logs() as logs:
            tick_until(backend, clock, 4 * CADENCE_S)
        assert fake.calls[UUID_READ] == 1 + 4  # asked again at each re-count
        assert [(g.index, g.uuid) for g in backend.gpus()] == [(0, UUID0)]
        assert [r.index for r in backend.read().gpus] == [0]
        assert [(e["gpu"], e["event"]) for e in logs if e["event"].startswith("nvml_gpu")] == [(1, "nvml_gpu_skipped")]
        backend.set_power_limit(UUID0, 650.0)
        assert (first.enforced_limit_mw, repeat.enforced_limit_mw) == (650_000, 700_000)


class TestCadence:
    @pytest.mark.parametrize("missing", [False, True], ids=["all-open", "one-missing"])
    def test_nothing_is_counted_between_cadences(self, missing: bool) -> None:
        """The device count is asked at start and then once every 30 s, never on the ticks in between,
        whether every GPU is open or one is still missing."""
        second = FakeGpu(uuid=UUID1, errors={UUID_READ: NVML_ERROR_TIMEOUT} if missing else {})
        backend, fake, clock = adapter(FakeGpu(uuid=UUID0), second)
        counts = []
        for _ in range(int(3 * CADENCE_S)):
            clock.advance(1.0)
            backend.read()
            counts.append(fake.calls[COUNT])
        expected = [1 + int(t // CADENCE_S) for t in range(1, int(3 * CADENCE_S) + 1)]
        assert counts == expected

    def test_a_failing_count_is_warned_once_and_tried_again(self) -> None:
        """A device count that fails at a re-count leaves the open GPUs read as usual, is warned about
        once, and is asked again at the next cadence, which picks up the new GPU."""
        backend, fake, clock = adapter(FakeGpu(uuid=UUID0))
        fake.gpus.append(FakeGpu(uuid=UUID1))
        real_count = fake.nvmlDeviceGetCount

        def failing_count() -> int:
            fake.calls[COUNT] += 1
            raise NVMLError(NVML_ERROR_UNKNOWN)

        fake.nvmlDeviceGetCount = failing_count  # type: ignore[method-assign]
        with capture_logs() as logs:
            tick_until(backend, clock, 3 * CADENCE_S)
            assert [r.health for r in backend.read().gpus] == [GpuHealth.OK]
            fake.nvmlDeviceGetCount = real_count  # type: ignore[method-assign]
            tick_until(backend, clock, 4 * CADENCE_S)
        assert fake.calls[COUNT] == 1 + 4
        assert len(events(logs, "nvml_gpu_count_failed")) == 1
        assert [g.uuid for g in backend.gpus()] == [UUID0, UUID1]


# ----------------------------------------------------------------------------- the governor


def governed(tmp_path: Path, *gpus: FakeGpu) -> tuple[Governor, FakeNvml, VirtualClock]:
    """The shipped config's governor (state under ``tmp_path``, not dry-run, started) over the NVML adapter."""
    clock = VirtualClock()
    fake = FakeNvml(gpus)
    backend = NvmlBackend(clock, nvml=fake)
    doc = dict(parse_toml(SHIPPED.read_bytes(), str(SHIPPED)), state_dir=str(tmp_path / "state"), runtime_dir="")
    doc.update(dry_run=False)
    config = parse_config(doc, str(SHIPPED))
    governor = Governor(config, backend, open_originals(config))
    governor.live = True  # as the service marks it once started
    return governor, fake, clock


class TestGoverned:
    def test_a_hot_gpu_skipped_at_start_is_governed_after_the_recount(self, tmp_path: Path) -> None:
        """A hot GPU whose UUID read timed out at start gets no plan and no write until the re-count; then
        the core follows the adapter's GPUs, builds its plan, and its heat leads to a lower limit."""
        hot = FakeGpu(uuid=UUID1, temperature_c=92, errors={UUID_READ: NVML_ERROR_TIMEOUT})
        governor, _, clock = governed(tmp_path, FakeGpu(uuid=UUID0), hot)
        before = step_ticks(governor, clock, 10)
        assert UUID1 not in governor.plans
        assert not any(r.decision.gpu_uuid == UUID1 for r in before)
        del hot.errors[UUID_READ]
        results = step_ticks(governor, clock, 30)
        assert UUID1 in governor.plans
        applied = [r for r in results if r.decision.gpu_uuid == UUID1 and r.outcome is Outcome.APPLIED]
        assert applied, results
        assert hot.enforced_limit_mw < 700_000
        assert governor.originals.get(UUID1) == 700.0  # saved before the first write, as for any GPU

    def test_a_crash_leftover_on_a_gpu_found_later_is_restored(self, tmp_path: Path) -> None:
        """A GPU found at the re-count that still carries a limit a crashed run set (its original saved)
        gets its original back, as a GPU present at start does."""
        state = tmp_path / "state"
        doc = dict(parse_toml(SHIPPED.read_bytes(), str(SHIPPED)), state_dir=str(state), runtime_dir="")
        open_originals(parse_config(doc, "crashed run")).remember(UUID1, 700.0, last_set_w=600.0)
        cool = FakeGpu(
            uuid=UUID1,
            enforced_limit_mw=600_000,
            requested_limit_mw=600_000,
            errors={UUID_READ: NVML_ERROR_UNKNOWN},
        )
        governor, _, clock = governed(tmp_path, FakeGpu(uuid=UUID0), cool)
        step_ticks(governor, clock, 10)
        assert cool.requested_limit_mw == 600_000  # not known yet: left as it is
        del cool.errors[UUID_READ]
        results = step_ticks(governor, clock, 25)
        restored = [r for r in results if r.decision.gpu_uuid == UUID1 and r.outcome is Outcome.APPLIED]
        assert [r.decision.to_w for r in restored] == [700.0]
        assert cool.requested_limit_mw == 700_000
