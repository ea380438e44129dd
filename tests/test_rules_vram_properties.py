"""Properties of the VRAM budget rule over any sequence of process sets, classes and memory pressure."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from hypothesis import example, given, settings
from hypothesis import strategies as st

from governor.classes import ACTIONS, ProcessAction, ProcessClass, ProcessMatch, VramPolicy
from governor.model import Action, Decision, GpuReading, ProcessReading
from governor.processes import ProcessFacts
from governor.rules.vram import VramState, evaluate_vram
from tests.support import Branch

GiB = 2**30
SETTINGS = settings(
    max_examples=200, deadline=None, derandomize=True
)  # the same examples each run: the share checks below cannot flake
MIN_SHARE = 0.2
"""Each property's branch must happen in at least this share of the examples."""
UUIDS = ("GPU-a", "GPU-b")
PIDS = (101, 102, 103)
TOTAL_BYTES = 12 * GiB
SIZES = (0, GiB, 2 * GiB, 3 * GiB, 3 * GiB + 1, 5 * GiB, 8 * GiB, 8 * GiB)
BUDGETS = (GiB, None, 2 * GiB, 3 * GiB, 6 * GiB, GiB)
"""Budgets drawn for a class (the first is hypothesis's simplest choice: one a process can exceed)."""
SIGNALS = (Action.SIGNAL_TERM, Action.SIGNAL_KILL)
ABSENT = -1
"""A process not on that GPU in this phase."""


@dataclass(frozen=True)
class Tick:
    """One tick: its time, each GPU's reading and the facts (class, identity, protection) of every pid."""

    t_s: float
    readings: tuple[GpuReading, ...]
    facts: Mapping[int, ProcessFacts]

    def __repr__(self) -> str:
        """t, each GPU's (pid, bytes) and the system memory use, each pid's (start, class, protected)."""
        gpus = [
            (r.uuid, r.memory_used_bytes, [(p.pid, p.used_memory_bytes) for p in r.processes or ()])
            for r in self.readings
        ]
        facts = {pid: (f.start_time, f.klass, f.protected) for pid, f in self.facts.items()}
        return f"Tick({self.t_s!r}, {gpus}, {facts})"


@dataclass(frozen=True)
class Case:
    """A VRAM policy and the ticks it is evaluated on."""

    policy: VramPolicy
    ticks: tuple[Tick, ...]


@dataclass(frozen=True)
class Evaluated:
    """A decision and the tick it was taken in."""

    tick: Tick
    decision: Decision


seconds = st.sampled_from([0.0, 1.0, 5.0, 30.0]) | st.floats(0.0, 60.0)
long_seconds = st.sampled_from([0.0, 1.0, 5.0, 30.0, 120.0]) | st.floats(0.0, 300.0)


def rarely(draw: st.DrawFn) -> bool:
    """True one time in four: protection is rare enough for escalations to happen before it appears
    (the last value, not hypothesis's simplest one, so simple examples are not all protected)."""
    return draw(st.integers(0, 3)) == 3


def process_classes(draw: st.DrawFn, name: str) -> ProcessClass:
    """A class with any budget, priority, action, grace, kill-after, dry-run and protection."""
    return ProcessClass(
        name=name,
        match=ProcessMatch(name=name, user="root"),
        budget_bytes=draw(st.sampled_from(BUDGETS)),
        priority=draw(st.integers(-5, 5)),
        action=draw(st.sampled_from([ProcessAction.TERMINATE, *ACTIONS])),
        grace_s=draw(seconds),
        kill_after_s=draw(long_seconds),
        dry_run=draw(st.booleans()),
        protected=rarely(draw),
    )


def draw_facts(
    draw: st.DrawFn, policy: VramPolicy, pid: int, start: int | None, klass: str, protected: bool
) -> ProcessFacts:
    """Facts as ProcessInspector gives them: protected when the class is, or for another reason."""
    reason = None
    if policy.class_named(klass).protected:
        reason = f"class {klass} is protected"
    elif protected:
        reason = draw(st.sampled_from(["PID 1", "a kernel thread", "the governor itself", "protected name 'Xorg'"]))
    return ProcessFacts.of(
        pid=pid,
        start_time=start,
        name=f"p{pid}",
        exe=None,
        cmdline=None,
        uid=0,
        user="root",
        cgroup=None,
        unit=None,
        slices=(),
        kernel_thread=reason == "a kernel thread",
        klass=klass,
        why="test",
        protected=reason,
    )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Any policy, and phases of steady ticks; between phases processes come, go, grow and shrink, PIDs are
    reused or vanish from /proc, and a config reload may give them new classes and protection."""
    classes = tuple(process_classes(draw, f"c{i}") for i in range(draw(st.integers(1, 3))))
    default = process_classes(draw, "unclassified")
    policy = VramPolicy(
        reserve_bytes=draw(st.sampled_from([0, GiB, 2 * GiB])),
        pressure_used_ratio=draw(st.floats(0.5, 1.0)),
        cooldown_s=draw(seconds),
        dry_run=draw(st.booleans()),
        classes=classes,
        default_class=default,
    )
    names = st.sampled_from([c.name for c in classes] + [default.name])
    starts: dict[int, int | None] = {pid: 1000 + pid for pid in PIDS}
    klasses = {pid: draw(names) for pid in PIDS}
    protected = {pid: rarely(draw) for pid in PIDS}
    memory: dict[tuple[str, int], int | None] = {}
    t_s = 0.0
    ticks = []
    for phase in range(draw(st.integers(1, 8))):
        if phase and draw(st.booleans()):  # a config reload: some classes change, protection may come or go
            klasses = {pid: draw(names) if rarely(draw) else klass for pid, klass in klasses.items()}
            protected = {pid: draw(st.booleans()) for pid in PIDS}
        for pid in PIDS:
            change = draw(st.integers(0, 7))
            if change == 0:  # the PID was reused by another process
                starts[pid] = draw(st.integers(0, 10**6))
            elif change == 1:  # gone from /proc (or never readable): no identity
                starts[pid] = None
        facts = {pid: draw_facts(draw, policy, pid, starts[pid], klasses[pid], protected[pid]) for pid in PIDS}
        readings = []
        for index, uuid in enumerate(UUIDS):
            for pid in PIDS:  # each process keeps its memory on each GPU unless it changes
                if phase == 0 or draw(st.integers(0, 2)) == 0:
                    memory[(uuid, pid)] = ABSENT if rarely(draw) else draw(st.sampled_from(SIZES) | st.none())
            processes = tuple(
                ProcessReading(pid=pid, used_memory_bytes=size)
                for pid in PIDS
                if (size := memory[(uuid, pid)]) != ABSENT
            )
            used = draw(st.sampled_from([2 * GiB, 9 * GiB, 11 * GiB, TOTAL_BYTES]))
            readings.append(
                GpuReading(
                    index=index,
                    uuid=uuid,
                    memory_used_bytes=used,
                    memory_total_bytes=TOTAL_BYTES,
                    processes=processes,
                )
            )
        dt_s = draw(st.sampled_from([0.5, 1.0, 5.0]) | st.floats(0.01, 40.0))
        for _ in range(draw(st.integers(1, 12))):
            t_s += dt_s
            ticks.append(Tick(t_s, tuple(readings), facts))
    if draw(st.integers(0, 4)) < 4:  # four in five (and the simplest example): a long squeeze at the end
        ticks.extend(squeeze(draw, policy, klasses, starts, t_s))
    return Case(policy, tuple(ticks))


def squeeze(
    draw: st.DrawFn, policy: VramPolicy, klasses: Mapping[int, str], starts: Mapping[int, int | None], t_s: float
) -> list[Tick]:
    """Ticks after ``t_s`` on full GPUs with the processes (same classes, known identities: a process
    gone from /proc is replaced by a new one, protection rare) over most budgets, in three stages
    that each outlast every grace, cooldown and kill-after: all processes, then one of them gone,
    then two, so a victim that leaves lets the rule pick the next (as a real one would exit)."""
    wait_s = max(
        policy.cooldown_s,
        *(c.grace_s + c.kill_after_s for c in (*policy.classes, policy.default_class)),
    )
    dt_s = draw(st.sampled_from([5.0, 10.0, 30.0]))
    facts = {pid: draw_facts(draw, policy, pid, starts[pid] or 10**7 + pid, klasses[pid], rarely(draw)) for pid in PIDS}
    sizes = {(uuid, pid): draw(st.sampled_from([8 * GiB, 5 * GiB, 3 * GiB + 1])) for uuid in UUIDS for pid in PIDS}
    order = draw(st.permutations(PIDS))
    ticks = []
    for stage in range(3):
        readings = tuple(
            GpuReading(
                index=index,
                uuid=uuid,
                memory_used_bytes=TOTAL_BYTES,
                memory_total_bytes=TOTAL_BYTES,
                processes=tuple(
                    ProcessReading(pid=pid, used_memory_bytes=sizes[(uuid, pid)])
                    for pid in PIDS
                    if pid not in order[:stage]
                ),
            )
            for index, uuid in enumerate(UUIDS)
        )
        for _ in range(math.ceil(wait_s / dt_s) + 2):
            t_s += dt_s
            ticks.append(Tick(t_s, readings, facts))
    return ticks


def protected_after_sigterm() -> Case:
    """SIGTERM at t = 1; a reload then protects the process (t = 10), which stays over budget past kill_after."""
    klass = ProcessClass(
        "c0", ProcessMatch(name="c0", user="root"), GiB, action=ProcessAction.TERMINATE, grace_s=0.0, kill_after_s=30.0
    )
    policy = VramPolicy(cooldown_s=0.0, classes=(klass,))
    reading = GpuReading(index=0, uuid=UUIDS[0], processes=(ProcessReading(pid=PIDS[0], used_memory_bytes=2 * GiB),))
    ticks = []
    for t_s in range(1, 41):
        facts = ProcessFacts.of(PIDS[0], 1000, "p", None, None, 0, "root", None, None, (), False, "c0", "test", None)
        if t_s >= 10:
            facts = facts.classified_as(protected="protected name 'Xorg'")
        ticks.append(Tick(float(t_s), (reading,), {PIDS[0]: facts}))
    return Case(policy, tuple(ticks))


def evaluate(case: Case) -> list[Evaluated]:
    """Run the rule on every GPU of every tick, carrying its state along."""
    state = VramState()
    out: list[Evaluated] = []
    for tick in case.ticks:
        for reading in tick.readings:
            state, decisions = evaluate_vram(reading, tick.facts, case.policy, state, tick.t_s)
            out.extend(Evaluated(tick, d) for d in decisions)
    return out


def signals(evaluated: list[Evaluated]) -> list[Evaluated]:
    """The decisions that send a signal."""
    return [e for e in evaluated if e.decision.action in SIGNALS]


def used_bytes(tick: Tick, decision: Decision) -> int | None:
    """What the tick's reading says the decision's process uses on the decision's GPU."""
    reading = next(r for r in tick.readings if r.uuid == decision.gpu_uuid)
    return next(p.used_memory_bytes for p in reading.processes or () if p.pid == decision.pid)


def over_budget_but_untouchable(case: Case) -> bool:
    """Whether some tick has a protected or unidentified process over its class budget on a GPU."""
    for tick in case.ticks:
        for reading in tick.readings:
            for process in reading.processes or ():
                facts = tick.facts[process.pid]
                budget = case.policy.class_named(facts.klass).budget_bytes
                used = process.used_memory_bytes
                untouchable = facts.protected is not None or facts.start_time is None
                if budget is not None and used is not None and used > budget and untouchable:
                    return True
    return False


class TestVramProperties:
    def test_protected_or_unidentified_processes_are_never_signalled(self) -> None:
        """A process that is protected, or whose start time is unknown, never gets a signal decision."""
        branch = Branch("a protected or unidentified process over its budget")

        @SETTINGS
        @given(cases())
        @example(protected_after_sigterm())
        def check(case: Case) -> None:
            for e in signals(evaluate(case)):
                facts = e.tick.facts[e.decision.pid or 0]
                assert facts.protected is None, e.decision
                assert facts.start_time is not None and e.decision.process_start_time == facts.start_time
            branch.saw(over_budget_but_untouchable(case))

        check()
        branch.require(MIN_SHARE)

    def test_dry_run_marks_every_signal(self) -> None:
        """Under [vram] dry_run or a dry-run class every signal decision carries dry_run=True, and only then."""
        branch = Branch("a signal decision")

        @SETTINGS
        @given(cases())
        def check(case: Case) -> None:
            sent = signals(evaluate(case))
            for e in sent:
                klass = case.policy.class_named(e.decision.process_class or "")
                assert e.decision.dry_run == (case.policy.dry_run or klass.dry_run), e.decision
            branch.saw(bool(sent))

        check()
        branch.require(MIN_SHARE)

    def test_at_most_one_new_victim_per_gpu_per_cooldown(self) -> None:
        """Two vram_enforce decisions on one GPU are at least cooldown_s apart."""
        branch = Branch("two victims on one GPU")

        @SETTINGS
        @given(cases())
        def check(case: Case) -> None:
            evaluated = evaluate(case)
            pairs = False
            for uuid in UUIDS:
                times = [
                    e.decision.t_s
                    for e in evaluated
                    if e.decision.rule == "vram_enforce" and e.decision.gpu_uuid == uuid
                ]
                for earlier, later in itertools.pairwise(times):
                    pairs = True
                    assert later - earlier >= case.policy.cooldown_s, (uuid, times)
            branch.saw(pairs)

        check()
        branch.require(MIN_SHARE)

    def test_sigkill_escalates_only_after_sigterm_and_kill_after(self) -> None:
        """vram_escalate sends SIGKILL only kill_after_s or more after a SIGTERM to the same (pid, start time)."""
        branch = Branch("an escalation")

        @SETTINGS
        @given(cases())
        def check(case: Case) -> None:
            evaluated = evaluate(case)
            terms = [
                e.decision
                for e in evaluated
                if e.decision.rule == "vram_enforce" and e.decision.action is Action.SIGNAL_TERM
            ]
            escalated = False
            for e in evaluated:
                d = e.decision
                if d.rule != "vram_escalate":
                    continue
                escalated = True
                assert d.action is Action.SIGNAL_KILL
                kill_after_s = case.policy.class_named(d.process_class or "").kill_after_s
                assert any(
                    (t.gpu_uuid, t.pid, t.process_start_time) == (d.gpu_uuid, d.pid, d.process_start_time)
                    and d.t_s - t.t_s >= kill_after_s
                    for t in terms
                ), d
            branch.saw(escalated)

        check()
        branch.require(MIN_SHARE)

    def test_a_process_under_its_budget_is_never_signalled(self) -> None:
        """A signal decision always targets a process over its class budget in that very tick."""
        branch = Branch("a signal decision")

        @SETTINGS
        @given(cases())
        def check(case: Case) -> None:
            sent = signals(evaluate(case))
            for e in sent:
                klass = case.policy.class_named(e.tick.facts[e.decision.pid or 0].klass)
                used = used_bytes(e.tick, e.decision)
                assert klass.budget_bytes is not None and used is not None and used > klass.budget_bytes, e.decision
            branch.saw(bool(sent))

        check()
        branch.require(MIN_SHARE)
