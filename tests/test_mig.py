"""MIG above the adapter: memory pressure per instance (VRAM and resume rules), the stopped-units file,
log events, metrics and `status`, through a daemon on the fake NVML (no GPU here runs MIG)."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import replace
from pathlib import Path

from governor.model import (
    Action,
    ActionResult,
    Decision,
    GpuReading,
    MigInstanceReading,
    Outcome,
    ProcessFacts,
    ProcessReading,
    Rule,
    Snapshot,
)
from governor.policy import ProcessAction, ProcessClass, ProcessMatch, VramPolicy
from governor.rules.units import UnitsState, evaluate_units, record_stop
from governor.rules.vram import Offender, VramState, evaluate_vram, mig_pressure, under_pressure
from governor.status import ProcessTable, parse_status, render_status, status_json
from governor.units import MemoryUnits
from governor.unitstate import StoppedUnitsStore, UnitKeeper, parse_entry
from tests.builders import MIG_A, MIG_B, GiB, full_mig_gpu, mig_daemon, process_facts
from tests.fake_pynvml import FakeGpu
from tests.support import require_tool

UNIT = "secondary-sd.service"

LEAKY = ProcessClass(
    "leaky", ProcessMatch(user="root"), 4 * GiB, priority=50, action=ProcessAction.TERMINATE, grace_s=60
)
YIELDING = ProcessClass(
    "secondary",
    ProcessMatch(unit=UNIT),
    8 * GiB,
    priority=50,
    action=ProcessAction.STOP_UNIT,
    grace_s=60,
    resume=True,
    resume_after_s=30.0,
)
POLICY = VramPolicy(reserve_bytes=2 * GiB, cooldown_s=30.0, classes=(LEAKY, YIELDING))


def instance(uuid: str, used: int | None, total: int | None, *procs: tuple[int, int | None]) -> MigInstanceReading:
    return MigInstanceReading(
        uuid=uuid,
        index=0 if uuid == MIG_A else 1,
        memory_used_bytes=used,
        memory_total_bytes=total,
        processes=tuple(ProcessReading(pid, u) for pid, u in procs),
    )


def mig_reading(*instances: MigInstanceReading, used: int | None = 30 * GiB, total: int = 80 * GiB) -> GpuReading:
    """GPU-0 in MIG mode with ``instances``; its processes as the adapter merges them; the parent's aggregate."""
    processes = tuple(p for i in instances for p in i.processes)
    return GpuReading(
        index=0,
        uuid="GPU-0",
        memory_used_bytes=used,
        memory_total_bytes=total,
        processes=processes,
        mig_enabled=True,
        mig_instances=instances,
    )


FULL_A = instance(MIG_A, 19 * GiB, 20 * GiB, (11, 6 * GiB))
ROOMY_B = instance(MIG_B, 10 * GiB, 40 * GiB, (12, 6 * GiB))


def facts(*pids: int, klass: str = "leaky", unit: str | None = None) -> dict[int, ProcessFacts]:
    return {
        pid: process_facts(pid, klass, name="p", unit=unit, slices=("system.slice",) if unit else ()) for pid in pids
    }


class TestPressure:
    def test_one_full_instance_triggers_pressure_only_there(self) -> None:
        """Two processes over budget, one in a full instance: only that one is acted on before its grace."""
        reading = mig_reading(FULL_A, ROOMY_B)
        assert under_pressure(reading, POLICY) and mig_pressure(reading, POLICY) == (FULL_A,)
        _, decisions = evaluate_vram(reading, facts(11, 12), POLICY, VramState(), 0.0)
        acted = [(d.pid, d.action) for d in decisions if d.rule is Rule.VRAM_ENFORCE]
        assert acted == [(11, Action.SIGNAL_TERM)]
        enforce = next(d for d in decisions if d.rule is Rule.VRAM_ENFORCE)
        assert f"memory pressure on MIG instance {MIG_A} (1GiB free)" in enforce.reason

    def test_a_full_card_without_a_full_instance_is_no_pressure(self) -> None:
        """The parent's aggregate near full while every instance has room is no pressure: nothing before grace."""
        reading = mig_reading(replace(FULL_A, memory_used_bytes=10 * GiB), ROOMY_B, used=79 * GiB)
        assert not under_pressure(reading, POLICY)
        _, decisions = evaluate_vram(reading, facts(11, 12), POLICY, VramState(), 0.0)
        assert [d.rule for d in decisions] == [Rule.VRAM_OVER_BUDGET, Rule.VRAM_OVER_BUDGET]

    def test_stop_unit_yields_only_in_the_full_instance(self) -> None:
        """A stop-unit process within budget makes room only when its own instance is full."""
        in_roomy = mig_reading(instance(MIG_A, 19 * GiB, 20 * GiB), instance(MIG_B, 10 * GiB, 40 * GiB, (12, GiB)))
        table = facts(12, klass="secondary", unit=UNIT)
        _, decisions = evaluate_vram(in_roomy, table, POLICY, VramState(), 0.0)
        assert decisions == []
        in_full = mig_reading(instance(MIG_A, 19 * GiB, 20 * GiB, (12, GiB)), instance(MIG_B, 10 * GiB, 40 * GiB))
        _, decisions = evaluate_vram(in_full, table, POLICY, VramState(), 0.0)
        assert [(d.action, d.unit) for d in decisions] == [(Action.STOP_UNIT, UNIT)]

    def test_a_reading_without_instances_is_judged_on_the_whole_gpu(self) -> None:
        """Not read per instance (no MIG, or the fallback), pressure is the GPU's, as before."""
        reading = replace(mig_reading(FULL_A, ROOMY_B, used=79 * GiB), mig_instances=None)
        assert under_pressure(reading, POLICY) and mig_pressure(reading, POLICY) == ()
        _, decisions = evaluate_vram(reading, facts(11, 12), POLICY, VramState(), 0.0)
        assert [d.pid for d in decisions if d.rule is Rule.VRAM_ENFORCE] == [12]  # ties go to the newest pid

    def test_an_instance_with_unknown_memory_is_never_under_pressure(self) -> None:
        """An instance whose memory NVML could not give is not full: unknown is neither full nor 0."""
        reading = mig_reading(instance(MIG_A, None, 20 * GiB, (11, 6 * GiB)), ROOMY_B)
        assert not under_pressure(reading, POLICY)
        _, decisions = evaluate_vram(reading, facts(11, 12), POLICY, VramState(), 0.0)
        assert Rule.VRAM_ENFORCE not in {d.rule for d in decisions}

    def test_the_budget_holds_the_sum_over_instances(self) -> None:
        """A process with 3 GiB in each of two instances is 6 GiB over a 4 GiB budget on that GPU."""
        split = mig_reading(instance(MIG_A, 5 * GiB, 20 * GiB), instance(MIG_B, 5 * GiB, 40 * GiB))
        reading = replace(split, processes=(ProcessReading(11, 6 * GiB),))
        _, decisions = evaluate_vram(reading, facts(11), POLICY, VramState(), 0.0)
        assert [(d.rule, d.reading) for d in decisions] == [(Rule.VRAM_OVER_BUDGET, float(6 * GiB))]


def enforced(
    ticks: list[tuple[float, GpuReading]], table: dict[int, ProcessFacts], state: VramState | None = None
) -> tuple[VramState, list[tuple[float, int | None, str]]]:
    """The rule run over ``ticks``; the state after, and (time, pid, unit or action) of each vram_enforce."""
    state = state or VramState()
    acted: list[tuple[float, int | None, str]] = []
    for t_s, reading in ticks:
        state, decisions = evaluate_vram(reading, table, POLICY, state, t_s)
        acted += [(d.t_s, d.pid, d.unit or d.action.value) for d in decisions if d.rule is Rule.VRAM_ENFORCE]
    return state, acted


FULL_B = instance(MIG_B, 39 * GiB, 40 * GiB, (12, 6 * GiB))
TERM = Action.SIGNAL_TERM.value


class TestCooldownPerInstance:
    """The cooldown and the one-victim-a-tick guard hold per memory pool: the whole GPU without MIG,
    each MIG instance (each GPU instance, whose compute instances share its memory) with it."""

    def test_two_full_instances_each_get_their_victim_in_the_same_tick(self) -> None:
        """Both instances under pressure at once: each one's over-budget process is signalled in the first tick."""
        _, acted = enforced([(0.0, mig_reading(FULL_A, FULL_B))], facts(11, 12))
        assert sorted(acted) == [(0.0, 11, TERM), (0.0, 12, TERM)]

    def test_a_victim_in_one_instance_does_not_hold_back_another(self) -> None:
        """Instance B filling up 5 s after a victim in A gets its own victim at once, not after A's cooldown."""
        ticks = [(0.0, mig_reading(FULL_A, ROOMY_B)), (5.0, mig_reading(FULL_A, FULL_B))]
        _, acted = enforced(ticks, facts(11, 12))
        assert acted == [(0.0, 11, TERM), (5.0, 12, TERM)]

    def test_a_victim_in_one_instance_does_not_let_another_of_it_act_early(self) -> None:
        """Two processes in one full instance (another full one beside it): the second waits the cooldown."""
        crowded = replace(FULL_A, processes=(ProcessReading(11, 6 * GiB), ProcessReading(13, 5 * GiB)))
        reading = mig_reading(crowded, FULL_B)
        ticks = [(float(t), reading) for t in (0, 1, 29, 30)]
        _, acted = enforced(ticks, facts(11, 12, 13))
        assert sorted(acted) == [(0.0, 11, TERM), (0.0, 12, TERM), (30.0, 13, TERM)]

    def test_stop_unit_and_signal_in_two_instances_in_the_same_tick(self) -> None:
        """A stop-unit process yielding in one full instance and an over-budget one in another both act at once."""
        table = {**facts(11), **facts(12, klass="secondary", unit=UNIT)}
        reading = mig_reading(FULL_A, instance(MIG_B, 39 * GiB, 40 * GiB, (12, GiB)))
        _, acted = enforced([(0.0, reading)], table)
        assert sorted(acted, key=str) == [(0.0, 11, TERM), (0.0, 12, UNIT)]

    def test_compute_instances_of_one_gpu_instance_share_the_cooldown(self) -> None:
        """Two MIG devices of one GPU instance share its memory: one victim between them per cooldown."""
        shared_a, shared_b = (replace(i, gpu_instance_id=1) for i in (FULL_A, FULL_B))
        ticks = [(float(t), mig_reading(shared_a, shared_b)) for t in (0, 1, 30)]
        _, acted = enforced(ticks, facts(11, 12))
        assert [(t, pid) for t, pid, _ in acted] == [(0.0, 12), (30.0, 11)]  # ties: the newest pid first

    def test_without_mig_one_victim_per_gpu_as_before(self) -> None:
        """The same processes on a GPU read as a whole (no instances): one victim per cooldown on the GPU."""
        reading = replace(mig_reading(FULL_A, FULL_B, used=79 * GiB), mig_instances=None)
        _, acted = enforced([(float(t), reading) for t in (0, 1, 30)], facts(11, 12))
        assert [(t, pid) for t, pid, _ in acted] == [(0.0, 12), (30.0, 11)]

    def test_a_pressure_victim_counts_only_against_the_full_instances_it_runs_in(self) -> None:
        """A process in a full and a roomy instance, within its grace, waits for the full one's cooldown."""
        full = instance(MIG_A, 19 * GiB, 20 * GiB, (13, 6 * GiB), (11, 3 * GiB))
        roomy = instance(MIG_B, 10 * GiB, 40 * GiB, (11, 3 * GiB))
        reading = replace(
            mig_reading(full, roomy), processes=(ProcessReading(13, 6 * GiB), ProcessReading(11, 6 * GiB))
        )
        _, acted = enforced([(float(t), reading) for t in (0, 1, 30)], facts(11, 13))
        assert [(t, pid) for t, pid, _ in acted] == [(0.0, 13), (30.0, 11)]

    def test_a_signal_for_another_gpu_cools_only_the_instances_the_process_runs_in(self) -> None:
        """A process SIGTERMed for another GPU cools its own instance here; the other full instance acts at once."""
        full_a = instance(MIG_A, 19 * GiB, 20 * GiB, (11, 6 * GiB), (13, 5 * GiB))
        reading = mig_reading(full_a, FULL_B)
        signalled = {(11, 1000): Offender(over_since_s=0.0, term_sent_s=0.0)}
        _, decisions = evaluate_vram(reading, facts(11, 12, 13), POLICY, VramState(), 1.0, signalled=signalled)
        assert [d.pid for d in decisions if d.rule is Rule.VRAM_ENFORCE] == [12]

    def test_the_cooldown_of_an_instance_gone_is_forgotten(self) -> None:
        """An instance destroyed after its victim keeps no cooldown entry once that cooldown is over."""
        state, _ = enforced([(0.0, mig_reading(FULL_A, FULL_B))], facts(11, 12))
        assert len(state.last_victim_s) == 2
        state, _ = enforced([(10.0, mig_reading(FULL_A))], facts(11, 12), state)
        assert len(state.last_victim_s) == 2  # B's cooldown still runs
        state, _ = enforced([(31.0, mig_reading(FULL_A))], facts(11, 12), state)
        assert [k for k in state.last_victim_s if MIG_B in k] == []


def stop_decision() -> Decision:
    return Decision(
        t_s=0.0,
        gpu_index=0,
        gpu_uuid="GPU-0",
        rule=Rule.VRAM_ENFORCE,
        action=Action.STOP_UNIT,
        reason="r",
        pid=12,
        process_class="secondary",
        unit=UNIT,
    )


def resumed(state: UnitsState, reading: GpuReading) -> list[Decision]:
    decisions: list[Decision] = []
    for t in (1.0, 40.0):
        # Two sampled ticks of a steady reading, not a gap in the readings.
        state, decisions = evaluate_units(Snapshot(t, 1.7e9 + t, (reading,)), state, POLICY, {}, math.inf)
    return decisions


class TestResume:
    def test_resume_waits_for_room_in_the_instance_the_unit_ran_in(self) -> None:
        """A unit stopped in instance A resumes only when A has room, whatever B has."""
        state = record_stop(UnitsState(), stop_decision(), YIELDING, 0.0, 1.7e9, True, (12,), (MIG_A,))
        assert resumed(state, mig_reading(instance(MIG_A, 15 * GiB, 20 * GiB), ROOMY_B)) == []
        (start,) = resumed(state, mig_reading(instance(MIG_A, 2 * GiB, 20 * GiB), ROOMY_B))
        assert start.action is Action.START_UNIT and f"MIG instance {MIG_A}" in start.reason

    def test_resume_without_a_known_instance_needs_one_with_room(self) -> None:
        """A unit whose instances are not known (or gone) resumes when any instance has room for its budget."""
        state = record_stop(UnitsState(), stop_decision(), YIELDING, 0.0, 1.7e9, True, (12,), ("MIG-gone",))
        full = mig_reading(instance(MIG_A, 15 * GiB, 20 * GiB), instance(MIG_B, 35 * GiB, 40 * GiB))
        assert resumed(state, full) == []
        (start,) = resumed(state, mig_reading(instance(MIG_A, 15 * GiB, 20 * GiB), ROOMY_B))
        assert f"MIG instance {MIG_B}" in start.reason

    def test_the_stop_records_the_instances_and_the_file_keeps_them(self, tmp_path: Path) -> None:
        """A stop applied on a MIG GPU records the unit's instances (and pressure there); the file keeps them."""
        reading = mig_reading(instance(MIG_A, 19 * GiB, 20 * GiB, (12, GiB)), instance(MIG_B, 0, 40 * GiB, (13, GiB)))
        snapshot = Snapshot(0.0, 1.7e9, (reading,))
        keeper = UnitKeeper(StoppedUnitsStore(tmp_path), MemoryUnits())
        table = facts(12, klass="secondary", unit=UNIT)
        keeper.record([ActionResult(stop_decision(), Outcome.APPLIED)], snapshot, 1.7e9, POLICY, table)
        entry = keeper.state.stopped[UNIT]
        assert (entry.reason, entry.mig_instances) == ("memory_pressure", (MIG_A,))
        saved = json.loads((tmp_path / "stopped-units.json").read_text())
        assert saved["units"][UNIT]["mig_instances"] == [MIG_A]
        assert StoppedUnitsStore(tmp_path).load()[UNIT].mig_instances == (MIG_A,)

    def test_bad_mig_instances_in_the_file_are_refused(self) -> None:
        """An entry whose mig_instances is not a list of UUIDs is refused, naming the key; one without it loads."""
        raw = {"class": "secondary", "reason": "over_budget", "gpus": ["GPU-0"], "stopped_at_s": 1.0}
        raw["resume_after_s"] = 30.0
        assert not isinstance(parse_entry(UNIT, raw), str)
        for bad in ("MIG-a", [1], ["a b"], ["x"] * 65):
            problem = parse_entry(UNIT, {**raw, "mig_instances": bad})
            assert isinstance(problem, str) and "mig_instances" in problem


class TestDaemon:
    def test_metrics_and_status_show_the_mig_mode_and_instances(self, tmp_path: Path) -> None:
        """The scrape has the MIG mode and each instance's memory and pressure; `status` shows them."""
        body, _ = mig_daemon(tmp_path, full_mig_gpu())
        labels = 'gpu="0",mig_uuid="{}",uuid="GPU-0"'
        assert 'gpu_governor_gpu_mig_mode{gpu="0",uuid="GPU-0"} 1.0' in body
        assert f"gpu_governor_mig_instance_memory_used_bytes{{{labels.format(MIG_A)}}} 2.0401094656e+10" in body
        assert f"gpu_governor_mig_instance_memory_total_bytes{{{labels.format(MIG_B)}}} 4.294967296e+10" in body
        assert f"gpu_governor_mig_instance_memory_pressure{{{labels.format(MIG_A)}}} 1.0" in body
        assert f"gpu_governor_mig_instance_memory_pressure{{{labels.format(MIG_B)}}} 0.0" in body
        assert 'gpu_governor_gpu_memory_pressure{gpu="0",uuid="GPU-0"} 1.0' in body
        status = parse_status(body)
        text = render_status(status, now_s=1.7e9)
        assert "on (2)" in text
        assert f"GPU 0 MIG instance {MIG_A}: 19.0/20.0 GiB (memory pressure)" in text
        assert f"GPU 0 MIG instance {MIG_B}: 10.0/40.0 GiB" in text
        (gpu,) = status_json(status, ProcessTable(None, "none"), "http://x", 1.7e9)["gpus"]
        assert gpu["mig_enabled"] is True
        assert gpu["mig_instances"][0] == {
            "uuid": MIG_A,
            "memory_used_bytes": 19 * GiB,
            "memory_total_bytes": 20 * GiB,
            "memory_pressure": True,
        }

    def test_a_gpu_without_mig_has_no_mig_series(self, tmp_path: Path) -> None:
        """A GPU whose MIG mode NVML does not know has no mode series (absent, not 0) and `-` in status;
        MIG disabled is 0, and neither has instance series."""
        body, _ = mig_daemon(tmp_path, FakeGpu(uuid="GPU-0", mig_mode=None))
        assert "gpu_governor_gpu_mig_mode{" not in body and "gpu_governor_mig_instance_memory_used_bytes{" not in body
        status = parse_status(body)
        assert status.gpus["0"].mig_enabled is None
        (gpu,) = status_json(status, ProcessTable(None, "none"), "http://x", 0.0)["gpus"]
        assert (gpu["mig_enabled"], gpu["mig_instances"]) == (None, [])
        body, _ = mig_daemon(tmp_path / "off", FakeGpu(uuid="GPU-0"))
        assert 'gpu_governor_gpu_mig_mode{gpu="0",uuid="GPU-0"} 0.0' in body
        assert "gpu_governor_mig_instance_memory_used_bytes{" not in body
        assert "off" in render_status(parse_status(body), now_s=1.7e9)

    def test_pressure_events_name_the_instance(self, tmp_path: Path) -> None:
        """Pressure in one instance logs one event naming it, with its own bytes, not the GPU's aggregate."""
        _, logs = mig_daemon(tmp_path, full_mig_gpu())
        began = [e for e in logs if e["event"] == "mig_memory_pressure_began"]
        assert [(e["instance"], e["used_bytes"], e["total_bytes"]) for e in began] == [(MIG_A, 19 * GiB, 20 * GiB)]
        assert [e for e in logs if e["event"] == "memory_pressure_began"] == []

    def test_promtool_is_silent_on_the_mig_metrics(self, tmp_path: Path) -> None:
        """`promtool check metrics` on a scrape with MIG series prints nothing."""
        promtool = require_tool("promtool")
        body, _ = mig_daemon(tmp_path, full_mig_gpu())
        result = subprocess.run(
            [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == "" and result.stderr == ""
