"""The actuator: idempotent, dry-run, clamping, originals, monitor-only, restore."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from governor.actuator import Actuator
from governor.backends import Backend, BackendError, GpuLostError, SetLimitFailed, SetLimitRefused
from governor.model import Action, Decision, GpuInfo, Outcome, Rule
from governor.rules.power import clamp_w
from governor.state import OriginalLimits
from tests.helpers import CARD_200W, H100, RecordingBackend, reading, snapshot


def set_to(watts: float, gpu: GpuInfo = CARD_200W, rule: Rule = Rule.POWER_STEP_DOWN) -> Decision:
    """A decision asking for ``watts`` on ``gpu``."""
    return Decision(
        t_s=1.0,
        gpu_index=gpu.index,
        gpu_uuid=gpu.uuid,
        rule=rule,
        action=Action.SET_POWER_LIMIT,
        reason="test",
        to_w=watts,
    )


def make(
    tmp_path: Path, *, dry_run: bool = False, gpus: tuple[GpuInfo, ...] = (CARD_200W, H100)
) -> tuple[Actuator, RecordingBackend]:
    """An actuator over a recording backend, with originals persisted under ``tmp_path``."""
    backend = RecordingBackend(infos=gpus)
    return Actuator(backend, OriginalLimits(tmp_path), gpus, dry_run=dry_run), backend


class TestBackendDouble:
    """The recording backend is a real Backend."""

    def test_satisfies_protocol(self) -> None:
        """RecordingBackend passes the runtime Backend protocol check."""
        assert isinstance(RecordingBackend(), Backend)


class TestApply:
    """apply(): one result per decision."""

    def test_sets_and_reports_applied(self, tmp_path: Path) -> None:
        """A new limit is written once through the backend and reported APPLIED."""
        act, backend = make(tmp_path)
        (result,) = act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        assert result.outcome is Outcome.APPLIED
        assert result.detail == "set 180 W"
        assert backend.calls == [(CARD_200W.uuid, 180.0)]

    def test_idempotent_when_already_enforced(self, tmp_path: Path) -> None:
        """No backend call when the enforced limit already equals the target."""
        act, backend = make(tmp_path)
        (result,) = act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 180.0)]))
        assert result.outcome is Outcome.UNCHANGED
        assert backend.calls == []
        assert act.originals.items() == []

    def test_close_but_different_is_written(self, tmp_path: Path) -> None:
        """An enforced limit 1 W away from the target is not 'already in force'."""
        act, backend = make(tmp_path)
        (result,) = act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 181.0)]))
        assert result.outcome is Outcome.APPLIED
        assert backend.calls == [(CARD_200W.uuid, 180.0)]

    def test_informational_decisions_skipped(self, tmp_path: Path) -> None:
        """A decision with Action.NONE is SKIPPED without a backend call."""
        act, backend = make(tmp_path)
        info = Decision(1.0, 1, CARD_200W.uuid, Rule.POWER_HOLD, Action.NONE, "hold", to_w=200.0)
        (result,) = act.apply([info], snapshot(1.0, [reading(None, 200.0)]))
        assert result.outcome is Outcome.SKIPPED
        assert backend.calls == []

    def test_one_result_per_decision_in_order(self, tmp_path: Path) -> None:
        """Several decisions give results in the same order."""
        act, _ = make(tmp_path)
        decisions = [set_to(180.0), set_to(300.0, H100)]
        snap = snapshot(1.0, [reading(80.0, 200.0), reading(80.0, 700.0, H100)])
        results = act.apply(decisions, snap)
        assert [r.decision for r in results] == decisions
        assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.APPLIED]

    def test_clamps_to_gpu_range(self, tmp_path: Path) -> None:
        """A 180 W request on an H100 (200-700 W) is written as 200 W."""
        act, backend = make(tmp_path)
        (result,) = act.apply([set_to(180.0, H100)], snapshot(1.0, [reading(80.0, 700.0, H100)]))
        assert result.outcome is Outcome.APPLIED
        assert backend.calls == [(H100.uuid, 200.0)]

    def test_clamped_value_already_enforced_is_unchanged(self, tmp_path: Path) -> None:
        """A request that clamps to the limit already in force makes no call."""
        act, backend = make(tmp_path)
        (result,) = act.apply([set_to(150.0, H100)], snapshot(1.0, [reading(80.0, 200.0, H100)]))
        assert result.outcome is Outcome.UNCHANGED
        assert backend.calls == []

    def test_reading_missing_without_original_is_refused(self, tmp_path: Path) -> None:
        """A GPU absent from the snapshot, with no saved original, is not written: its original is unknown."""
        act, backend = make(tmp_path)
        (result,) = act.apply([set_to(180.0)], snapshot(1.0, []))
        assert result.outcome is Outcome.REFUSED
        assert "original limit unknown" in (result.detail or "")
        assert backend.calls == []
        assert act.originals.items() == []

    def test_reading_missing_with_saved_original_still_sets(self, tmp_path: Path) -> None:
        """A GPU absent from the snapshot whose original is already saved is still written."""
        act, backend = make(tmp_path)
        act.originals.remember(CARD_200W.uuid, 200.0)
        (result,) = act.apply([set_to(180.0)], snapshot(1.0, []))
        assert result.outcome is Outcome.APPLIED
        assert backend.calls == [(CARD_200W.uuid, 180.0)]


class TestDryRun:
    """dry_run: decide and say 'would set', never write."""

    def test_never_calls_backend(self, tmp_path: Path) -> None:
        """A dry-run set returns DRY_RUN with 'would set' and the clamped value, without a call."""
        act, backend = make(tmp_path, dry_run=True)
        (result,) = act.apply([set_to(180.0, H100)], snapshot(1.0, [reading(80.0, 700.0, H100)]))
        assert result.outcome is Outcome.DRY_RUN
        assert result.detail == "would set 200 W"
        assert backend.calls == []

    def test_does_not_remember_originals(self, tmp_path: Path) -> None:
        """Dry-run records no original limit, in memory or on disk."""
        act, _ = make(tmp_path, dry_run=True)
        act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        assert act.originals.items() == []
        assert OriginalLimits(tmp_path).items() == []

    def test_a_step_up_stops_at_the_original_the_live_path_would_save(self, tmp_path: Path) -> None:
        """A card an admin set to 165 W: after a would-be step down, a step up to 180 W says "would set
        165 W" (the enforced limit at the first change, the original a live run saves), not 180 W, and
        one to 200 W then finds 165 W already in force; nothing is saved or written."""
        act, backend = make(tmp_path, dry_run=True)
        results = [
            act.apply([set_to(watts)], snapshot(t_s, [reading(80.0, 165.0)]))[0]
            for t_s, watts in ((1.0, 150.0), (2.0, 180.0), (3.0, 200.0))
        ]
        assert [(r.outcome, r.detail) for r in results] == [
            (Outcome.DRY_RUN, "would set 150 W"),
            (Outcome.DRY_RUN, "would set 165 W"),
            (Outcome.UNCHANGED, "165 W already in force"),
        ]
        assert backend.calls == []
        assert act.originals.items() == []

    def test_the_dry_run_cap_is_the_live_runs(self, tmp_path: Path) -> None:
        """The same steps live and in dry run write (would write) the same limits: the cap is the same."""
        steps = ((1.0, 150.0), (2.0, 180.0), (3.0, 120.0), (4.0, 210.0))
        live, card = make(tmp_path / "live")
        dry, _ = make(tmp_path / "dry", dry_run=True)
        would = []
        for t_s, watts in steps:
            enforced = card.calls[-1][1] if card.calls else 165.0  # what the live card enforces now
            live.apply([set_to(watts)], snapshot(t_s, [reading(80.0, enforced)]))
            (result,) = dry.apply([set_to(watts)], snapshot(t_s, [reading(80.0, 165.0)]))  # never changed
            if result.outcome is Outcome.DRY_RUN:
                would.append(result.detail)
        assert [w for _, w in card.calls] == [150.0, 165.0, 120.0, 165.0]
        assert would == ["would set 150 W", "would set 165 W", "would set 120 W", "would set 165 W"]

    def test_restore_in_dry_run(self, tmp_path: Path) -> None:
        """A dry-run restore reports 'would set' and keeps the saved entry."""
        OriginalLimits(tmp_path).remember(CARD_200W.uuid, 200.0)
        act, backend = make(tmp_path, dry_run=True)
        (result,) = act.restore(snapshot(1.0, [reading(60.0, 180.0)]), 9.0, "restore_on_stop")
        assert result.outcome is Outcome.DRY_RUN
        assert backend.calls == []
        assert act.originals.get(CARD_200W.uuid) == 200.0


class TestOriginals:
    """The original limit is remembered before the first change only."""

    def test_first_change_remembers_enforced(self, tmp_path: Path) -> None:
        """The enforced limit before the first write is saved as the original."""
        act, _ = make(tmp_path)
        act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        assert act.originals.get(CARD_200W.uuid) == 200.0

    def test_later_changes_keep_first_original(self, tmp_path: Path) -> None:
        """Further writes do not overwrite the saved original with the governor's own limits."""
        act, _ = make(tmp_path)
        act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        act.apply([set_to(150.0)], snapshot(2.0, [reading(80.0, 180.0)]))
        act.apply([set_to(200.0)], snapshot(3.0, [reading(60.0, 150.0)]))
        assert act.originals.get(CARD_200W.uuid) == 200.0

    def test_original_survives_a_new_instance(self, tmp_path: Path) -> None:
        """The original is persisted: a new store over the same directory (a restart) knows it."""
        act, _ = make(tmp_path)
        act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        again, _ = make(tmp_path)
        assert again.originals.get(CARD_200W.uuid) == 200.0


class TestFailures:
    """Refused and failed writes."""

    def test_refused_makes_gpu_monitor_only(self, tmp_path: Path) -> None:
        """SetLimitRefused fails the decision and marks the GPU monitor-only with the reason."""
        act, backend = make(tmp_path)
        backend.fail_with = SetLimitRefused("NO_PERMISSION")
        (result,) = act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        assert result.outcome is Outcome.FAILED
        assert "monitor-only" in (result.detail or "")
        assert act.monitor_only == {CARD_200W.uuid: "NO_PERMISSION"}

    def test_monitor_only_refuses_without_backend_calls(self, tmp_path: Path) -> None:
        """After a refusal, later decisions for that GPU are REFUSED and never reach the backend."""
        act, backend = make(tmp_path)
        backend.fail_with = SetLimitRefused("NOT_SUPPORTED")
        act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        backend.fail_with = None
        results = act.apply(
            [set_to(150.0), set_to(300.0, H100)], snapshot(2.0, [reading(80.0, 200.0), reading(80.0, 700.0, H100)])
        )
        assert results[0].outcome is Outcome.REFUSED
        assert results[0].detail == "monitor-only: NOT_SUPPORTED"
        assert results[1].outcome is Outcome.APPLIED
        assert backend.calls == [(CARD_200W.uuid, 180.0), (H100.uuid, 300.0)]

    def test_refused_first_write_leaves_nothing_to_restore(self, tmp_path: Path) -> None:
        """A refused first write removes the saved original, so stop never retries a monitor-only GPU."""
        act, backend = make(tmp_path)
        backend.fail_with = SetLimitRefused("NO_PERMISSION")
        act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        assert act.originals.items() == []
        assert OriginalLimits(tmp_path).items() == []
        assert act.restore(snapshot(2.0, [reading(80.0, 200.0)]), 2.0, "restore_on_stop") == []
        assert backend.calls == [(CARD_200W.uuid, 180.0)]

    @pytest.mark.parametrize("error", [SetLimitFailed("busy"), GpuLostError("gone")])
    def test_transient_failure_is_retried_later(self, tmp_path: Path, error: BackendError) -> None:
        """A failure that may pass leaves the GPU governable: the next decision is written."""
        act, backend = make(tmp_path)
        backend.fail_with = error
        (result,) = act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        assert result.outcome is Outcome.FAILED
        assert result.detail == str(error)
        assert act.monitor_only == {}
        backend.fail_with = None
        (again,) = act.apply([set_to(180.0)], snapshot(2.0, [reading(80.0, 200.0)]))
        assert again.outcome is Outcome.APPLIED


class TestRestore:
    """restore(): put originals back and forget them."""

    def test_restores_and_forgets(self, tmp_path: Path) -> None:
        """Every saved original is written back and then dropped, on disk too."""
        act, backend = make(tmp_path)
        act.apply(
            [set_to(180.0), set_to(300.0, H100)], snapshot(1.0, [reading(80.0, 200.0), reading(80.0, 700.0, H100)])
        )
        backend.calls.clear()
        results = act.restore(snapshot(5.0, [reading(60.0, 180.0), reading(60.0, 300.0, H100)]), 5.0, "restore_on_stop")
        assert sorted(backend.calls) == sorted([(CARD_200W.uuid, 200.0), (H100.uuid, 700.0)])
        assert {r.outcome for r in results} == {Outcome.APPLIED}
        assert all(r.decision.rule == "restore_on_stop" and r.decision.t_s == 5.0 for r in results)
        assert act.originals.items() == []
        assert OriginalLimits(tmp_path).items() == []

    def test_already_original_is_unchanged_and_forgotten(self, tmp_path: Path) -> None:
        """A GPU already back at its original limit gets no call and its entry is dropped."""
        act, backend = make(tmp_path)
        act.originals.remember(CARD_200W.uuid, 200.0)
        (result,) = act.restore(snapshot(5.0, [reading(60.0, 200.0)]), 5.0, "restore_on_stop")
        assert result.outcome is Outcome.UNCHANGED
        assert backend.calls == []
        assert act.originals.items() == []

    def test_skips_gpu_not_present(self, tmp_path: Path) -> None:
        """An original for a GPU this host no longer has is skipped and kept for later."""
        OriginalLimits(tmp_path).remember("GPU-elsewhere", 250.0)
        act, backend = make(tmp_path)
        (result,) = act.restore(None, 5.0, "restore_after_crash")
        assert result.outcome is Outcome.SKIPPED
        assert result.decision.gpu_index == -1
        assert backend.calls == []
        assert act.originals.get("GPU-elsewhere") == 250.0

    def test_failed_restore_keeps_entry(self, tmp_path: Path) -> None:
        """A restore that fails keeps the original so a later start can retry it."""
        act, backend = make(tmp_path)
        act.originals.remember(CARD_200W.uuid, 200.0)
        backend.fail_with = SetLimitFailed("busy")
        (result,) = act.restore(None, 5.0, "restore_on_stop")
        assert result.outcome is Outcome.FAILED
        assert act.originals.get(CARD_200W.uuid) == 200.0

    def test_restore_without_snapshot_writes(self, tmp_path: Path) -> None:
        """Without a snapshot (restore at start) the original is written blind."""
        act, backend = make(tmp_path)
        act.originals.remember(H100.uuid, 700.0)
        (result,) = act.restore(None, 0.0, "restore_on_stop")
        assert result.outcome is Outcome.APPLIED
        assert result.decision.from_value is None
        assert backend.calls == [(H100.uuid, 700.0)]


_UUIDS = (H100.uuid, CARD_200W.uuid, "GPU-gone")
_RANGES = ((100.0, 220.0), (150.0, 180.0), (200.0, 700.0), (None, None))
_OPS = st.one_of(
    st.tuples(st.just("remember"), st.sampled_from(_UUIDS), st.floats(50.0, 800.0), st.none() | st.floats(50.0, 800.0)),
    st.tuples(st.just("reject"), st.sampled_from(_UUIDS)),
    st.tuples(st.just("forget"), st.sampled_from(_UUIDS)),
    st.tuples(st.just("gpus"), st.sampled_from(_RANGES), st.booleans()),
)


class TestCapsCache:
    """caps_w() is rebuilt only when the originals or the GPUs changed, and always equals a fresh one."""

    @staticmethod
    def _fresh(act: Actuator, gpus: dict[str, GpuInfo]) -> dict[str, float]:
        return {uuid: clamp_w(watts, gpus.get(uuid)) for uuid, watts in act.originals.items()}

    @settings(max_examples=150, deadline=None)
    @given(st.lists(_OPS, max_size=25))
    def test_equals_a_fresh_build_across_random_changes(self, ops: list[tuple[Any, ...]]) -> None:
        """After any sequence of saves, rejections, forgets and GPU changes, caps_w() (asked twice) is the fresh map."""
        gpus = {g.uuid: g for g in (CARD_200W, H100)}
        act = Actuator(RecordingBackend(infos=tuple(gpus.values())), OriginalLimits(None), tuple(gpus.values()))
        assert act.caps_w() == {}
        for op in ops:
            if op[0] == "remember":
                act.originals.remember(op[1], op[2], op[3])
            elif op[0] == "reject":
                act.originals.reject(op[1], "test")
            elif op[0] == "forget":
                act.originals.forget(op[1])
            else:
                (low, high), keep_h100 = op[1], op[2]
                card = dataclasses.replace(CARD_200W, power_limit_min_w=low, power_limit_max_w=high)
                gpus = {g.uuid: g for g in ((card, H100) if keep_h100 else (card,))}
                act.set_gpus(gpus.values())
            first, second = act.caps_w(), act.caps_w()  # the second is the kept one
            assert first == second == self._fresh(act, gpus)

    def test_a_narrowed_range_clamps_the_kept_cap_again(self) -> None:
        """A saved 200 W original caps at 200 W, then at 180 W once the card reports a 150-180 W range."""
        act = Actuator(RecordingBackend(infos=(CARD_200W,)), OriginalLimits(None), (CARD_200W,))
        act.originals.remember(CARD_200W.uuid, 200.0)
        assert act.caps_w() == {CARD_200W.uuid: 200.0}
        act.set_gpus([dataclasses.replace(CARD_200W, power_limit_min_w=150.0, power_limit_max_w=180.0)])
        assert act.caps_w() == {CARD_200W.uuid: 180.0}
        act.originals.forget(CARD_200W.uuid)
        assert act.caps_w() == {}
