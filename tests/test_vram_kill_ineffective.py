"""A SIGKILL that does not end the process: reported, sent again at a bounded cadence, then given up on.

A process in uninterruptible sleep in the driver, a zombie whose memory another holder keeps, or a
PID the signal cannot reach stays listed by NVML, over its budget, after its SIGKILL. The pure rule
is driven tick by tick; the actuator, the log and the metrics are checked on a real zombie child
(a child that exited and is not reaped: /proc says ``Z`` and a SIGKILL changes nothing).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from governor.actuator import Actuator
from governor.classes import ProcessAction, ProcessClass, ProcessMatch, VramPolicy
from governor.messages import message
from governor.metrics import build_registry
from governor.model import Action, ActionResult, Decision, GpuReading, Outcome, Rule, Snapshot
from governor.observers import DecisionLog
from governor.processes import ProcessFacts, read_process_state, read_start_time
from governor.rules.vram import (
    KILL_FOLLOW_UPS,
    KILL_RECHECK_MIN_S,
    KILL_RETRIES_MAX,
    REMEMBERED_OFFENDERS_MAX,
    VramState,
    evaluate_vram,
)
from governor.state import OriginalLimits
from tests.builders import GiB, Harness, classes_toml, listing, process_facts, spawn, two_gpu_governor
from tests.support import Branch

KILL_AFTER_S = 10.0
TERMINATE = ProcessClass(
    "secondary",
    ProcessMatch(user="u"),
    3 * GiB,
    priority=50,
    action=ProcessAction.TERMINATE,
    grace_s=30,
    kill_after_s=KILL_AFTER_S,
)
POLICY = VramPolicy(reserve_bytes=2 * GiB, classes=(TERMINATE,), cooldown_s=20)
DRY = replace(POLICY, dry_run=True)
OVER = 4 * GiB
"""A use over the 3 GiB budget."""
FIRST_KILL_S = 40.0
"""When a process over budget from t=0 gets its SIGKILL: grace 30 s, then kill_after 10 s."""


def reading(*procs: tuple[int, int | None]) -> GpuReading:
    """GPU-0 (80 GiB, 6 GiB used) listing ``procs`` as (pid, used bytes)."""
    return listing(*procs, used=6 * GiB, total=80 * GiB)


def table(*pids: int, start: int = 1000) -> dict[int, ProcessFacts]:
    """Facts of ``pids``, all of class secondary, started at ``start`` (clock ticks)."""
    return {p: process_facts(p, "secondary", start_time=start, name=f"p{p}") for p in pids}


def run(
    ticks: Iterable[tuple[float, GpuReading, dict[int, ProcessFacts], VramPolicy]], state: VramState | None = None
) -> tuple[VramState, list[Decision]]:
    """Every (time, reading, facts, policy) through the rule; the last state and every decision."""
    state = VramState() if state is None else state
    out: list[Decision] = []
    for t, r, facts, policy in ticks:
        state, decisions = evaluate_vram(r, facts, policy, state, t)
        out.extend(decisions)
    return state, out


def stuck(
    seconds: int, policy: VramPolicy = POLICY, start: int = 0
) -> Iterable[tuple[float, GpuReading, dict[int, ProcessFacts], VramPolicy]]:
    """Process 2 listed over budget every second from ``start`` for ``seconds``: it never dies."""
    facts = table(2)
    return ((float(t), reading((2, OVER)), facts, policy) for t in range(start, start + seconds))


def follow_ups(decisions: Sequence[Decision]) -> list[tuple[str, Action, float]]:
    """(rule, action, time) of the decisions about a process that outlived its SIGKILL."""
    return [(str(d.rule), d.action, d.t_s) for d in decisions if d.rule in KILL_FOLLOW_UPS]


class TestRule:
    def test_a_process_still_listed_after_its_sigkill_is_reported_and_killed_again(self) -> None:
        """The same process still listed and over budget kill_after_s after its SIGKILL: reported, SIGKILLed again."""
        _, decisions = run(stuck(60))
        ineffective = [d for d in decisions if d.rule == "vram_kill_ineffective"]
        assert ineffective, "a process that outlived its SIGKILL was never reported (the old rule stays silent)"
        first = ineffective[0]
        assert (first.t_s, first.action, first.dry_run) == (FIRST_KILL_S + KILL_AFTER_S, Action.SIGNAL_KILL, False)
        assert (first.pid, first.process_start_time, first.process_class, first.process_name) == (
            2,
            1000,
            "secondary",
            "p2",
        )
        assert (first.reading, first.threshold, first.kill_sent_s) == (OVER, 3 * GiB, FIRST_KILL_S)
        assert "10 s after the first SIGKILL" in first.reason

    def test_retries_come_once_per_kill_after_then_one_give_up_then_silence(self) -> None:
        """SIGKILL is sent again once per kill_after_s, KILL_RETRIES_MAX times, then given up once; nothing after."""
        _, decisions = run(stuck(3600))
        expected = [
            ("vram_kill_ineffective", Action.SIGNAL_KILL, FIRST_KILL_S + KILL_AFTER_S * n)
            for n in range(1, KILL_RETRIES_MAX + 1)
        ]
        expected.append(("vram_kill_given_up", Action.NONE, FIRST_KILL_S + KILL_AFTER_S * (KILL_RETRIES_MAX + 1)))
        assert follow_ups(decisions) == expected
        assert len(decisions) == 3 + KILL_RETRIES_MAX + 1  # report, SIGTERM, SIGKILL, retries, give-up: an hour

    def test_a_kill_after_of_zero_still_gives_the_sigkill_time_to_work(self) -> None:
        """kill_after_s = 0: a SIGKILL is found ineffective only KILL_RECHECK_MIN_S after it, retries as far apart."""
        quick = replace(TERMINATE, kill_after_s=0.0)
        _, decisions = run(stuck(300, replace(POLICY, classes=(quick,))))
        kill_s = next(d.t_s for d in decisions if d.rule == "vram_escalate")
        assert [t for _, _, t in follow_ups(decisions)] == [
            kill_s + KILL_RECHECK_MIN_S * n for n in range(1, KILL_RETRIES_MAX + 2)
        ]

    def test_a_kill_class_is_followed_up_the_same_way(self) -> None:
        """A class whose action is kill (no SIGTERM) is followed up after its one SIGKILL just the same."""
        killer = replace(TERMINATE, action=ProcessAction.KILL)
        policy = replace(POLICY, classes=(killer,))
        _, decisions = run(stuck(200, policy))
        kills = [d.t_s for d in decisions if d.action is Action.SIGNAL_KILL]
        assert kills == [30.0 + KILL_AFTER_S * n for n in range(KILL_RETRIES_MAX + 1)]
        assert [r for r, _, _ in follow_ups(decisions)][-1] == "vram_kill_given_up"

    def test_a_process_whose_memory_came_back_is_not_followed_up(self) -> None:
        """A process within budget, or off the listing, after its SIGKILL gets no follow-up: the kill worked."""
        facts = table(2)
        for after in (reading((2, 1 * GiB)), reading()):
            ticks = [(float(t), reading((2, OVER)) if t <= FIRST_KILL_S else after, facts, POLICY) for t in range(300)]
            _, decisions = run(ticks)
            assert follow_ups(decisions) == []
            assert [d.action for d in decisions if d.action is not Action.NONE] == [
                Action.SIGNAL_TERM,
                Action.SIGNAL_KILL,
            ]

    def test_a_reused_pid_is_never_taken_for_the_killed_process(self) -> None:
        """After the SIGKILL, pid 2 under another start time is a new process: no follow-up, a report of its own."""
        state, decisions = run(stuck(41))
        assert decisions[-1].action is Action.SIGNAL_KILL
        newcomer = table(2, start=5000)
        _, later = run(((float(t), reading((2, OVER)), newcomer, POLICY) for t in range(41, 65)), state)
        assert follow_ups(later) == []
        assert [(d.rule, d.process_start_time) for d in later] == [("vram_over_budget", 5000)]

    def test_a_class_made_observe_after_the_sigkill_gets_no_more(self) -> None:
        """A reload that makes the class observe-only after the SIGKILL stops the retries (no signal, no report)."""
        state, _ = run(stuck(41))
        observe = replace(POLICY, classes=(replace(TERMINATE, action=ProcessAction.OBSERVE),))
        _, later = run(stuck(200, observe, start=41), state)
        assert later == []

    def test_the_escalation_memory_stays_bounded(self) -> None:
        """Offenders that outlived a SIGKILL and left are kept REMEMBERED_OFFENDERS_MAX per GPU at most, then not."""
        many = REMEMBERED_OFFENDERS_MAX + 200
        facts = {p: process_facts(p, "secondary", start_time=1000, name="p") for p in range(10, 10 + many)}
        crowd = reading(*((p, OVER) for p in range(10, 10 + many)))
        state, decisions = run((float(t), crowd, facts, POLICY) for t in range(0, 51))
        assert sum(d.rule == "vram_kill_ineffective" for d in decisions) == 1  # one victim per cooldown
        assert len(state.offenders) == many
        state, _ = evaluate_vram(reading(), facts, POLICY, state, 51)
        assert len(state.offenders) == REMEMBERED_OFFENDERS_MAX
        state, _ = evaluate_vram(reading(), facts, POLICY, state, 51 + max(TERMINATE.grace_s, KILL_AFTER_S))
        assert dict(state.offenders) == {}


class TestDryRun:
    def test_a_would_be_sigkill_never_counts_as_a_real_one(self) -> None:
        """In a dry run the process outlives every would-be SIGKILL: that is never reported as an ineffective kill."""
        _, decisions = run(stuck(3600, DRY))
        assert [d.action for d in decisions if d.action is not Action.NONE] == [Action.SIGNAL_TERM, Action.SIGNAL_KILL]
        assert all(d.dry_run for d in decisions if d.action is not Action.NONE)
        assert follow_ups(decisions) == []

    def test_a_would_be_sigkill_after_a_real_sigterm_is_sent_for_real_once_live(self) -> None:
        """Real SIGTERM, then a dry run's would-be SIGKILL, then live again: the real SIGKILL goes out at once."""
        state, first = run(stuck(31))
        assert [(d.action, d.dry_run) for d in first if d.action is not Action.NONE] == [(Action.SIGNAL_TERM, False)]
        state, dry = run(stuck(20, DRY, start=31), state)
        assert [(d.action, d.dry_run) for d in dry if d.action is not Action.NONE] == [(Action.SIGNAL_KILL, True)]
        assert follow_ups(dry) == []
        _, live = run(stuck(1, POLICY, start=51), state)
        assert [(str(d.rule), d.action, d.dry_run, d.t_s) for d in live] == [
            ("vram_escalate", Action.SIGNAL_KILL, False, 51.0)
        ]

    def test_a_real_sigkill_that_did_not_work_is_reported_with_would_be_retries_in_a_dry_run(self) -> None:
        """A real SIGKILL, then a dry run: the ineffective kill is still reported, its retries only "would", bounded."""
        state, _ = run(stuck(41))
        _, dry = run(stuck(3600, DRY, start=41), state)
        found = [d for d in dry if d.rule in KILL_FOLLOW_UPS]
        assert [str(d.rule) for d in found] == ["vram_kill_ineffective"] * KILL_RETRIES_MAX + ["vram_kill_given_up"]
        assert all(d.dry_run and d.kill_sent_s == FIRST_KILL_S for d in found)


# ----------------------------------------------------------------------------- a property


@st.composite
def lives(draw: st.DrawFn) -> list[tuple[float, int | None, bool]]:
    """Ticks of one process: (time, its use: bytes, None unreported or -1 off the listing, dry run)."""
    out = []
    t = 0.0
    for _ in range(draw(st.integers(20, 120))):
        t += draw(st.sampled_from([1.0, 1.0, 2.5, 7.0, 15.0]))
        use = draw(st.sampled_from([OVER, OVER, OVER, OVER, 1 * GiB, None, -1]))
        out.append((t, use, draw(st.integers(0, 9)) == 0))
    return out


class TestProperties:
    def test_follow_ups_only_after_a_real_sigkill_spaced_and_bounded(self) -> None:
        """Any life: follow-ups only over budget, kill_after_s after a real SIGKILL and apart, 4 per SIGKILL at most."""
        branch = Branch("a follow-up")

        @settings(max_examples=150, deadline=None, derandomize=True)
        @given(lives())
        def check(life: list[tuple[float, int | None, bool]]) -> None:
            facts = table(2)
            ticks = [
                (t, reading() if use == -1 else reading((2, use)), facts, DRY if dry else POLICY)
                for t, use, dry in life
            ]
            _, decisions = run(ticks)
            over_at = {t for t, use, _ in life if use is not None and use > 3 * GiB}
            first_kills = [
                d.t_s
                for d in decisions
                if d.rule in ("vram_escalate", "vram_enforce") and d.action is Action.SIGNAL_KILL and not d.dry_run
            ]
            found = [d for d in decisions if d.rule in KILL_FOLLOW_UPS]
            for d in found:
                assert d.t_s in over_at
                assert d.kill_sent_s is not None and d.kill_sent_s in first_kills
                assert d.t_s - d.kill_sent_s >= KILL_AFTER_S
            times = [d.t_s for d in found]
            assert all(b - a >= KILL_AFTER_S for a, b in itertools.pairwise(times))
            assert len(found) <= (KILL_RETRIES_MAX + 1) * len(first_kills)
            branch.saw(bool(found))

        check()
        branch.require(0.2)


# ----------------------------------------------------------------------------- /proc, the actuator, the log

ZOMBIE = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)"
)
"""A child that ignores SIGTERM: SIGKILLed and never reaped by the test, it stays a zombie."""


def zombie(children: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """A child that has exited and is not reaped (its /proc state is Z)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    children.append(child)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        start = read_start_time(child.pid)
        if start is not None and read_process_state(child.pid, start) == "Z":
            return child
        time.sleep(0.02)
    raise AssertionError("the child never became a zombie")


def follow_up_decision(pid: int, start: int, rule: Rule = Rule.VRAM_KILL_INEFFECTIVE) -> Decision:
    """A follow-up about (pid, start) on GPU 0: SIGKILL again, or (given up) nothing."""
    action = Action.SIGNAL_KILL if rule is Rule.VRAM_KILL_INEFFECTIVE else Action.NONE
    return Decision(
        t_s=62.5,
        gpu_index=0,
        gpu_uuid="GPU-0",
        rule=rule,
        action=action,
        reason="still listed",
        reading=float(OVER),
        threshold=float(3 * GiB),
        pid=pid,
        process_start_time=start,
        process_class="secondary",
        process_name="stuck",
        kill_sent_s=40.0,
    )


def actuator(tmp_path: Path, calls: list[str]) -> Actuator:
    """An actuator without GPUs whose signals and /proc state reads are recorded in ``calls``."""

    def signaller(pid: int, start: int, signum: int) -> str | None:
        calls.append(f"signal {signum}")
        return None

    def state(pid: int, start: int) -> str | None:
        calls.append("state")
        return "D"

    act = Actuator(
        None,  # type: ignore[arg-type]  # no limit is set: the backend is never called
        OriginalLimits(tmp_path / "originals.json"),
        [],
        signaller=signaller,
    )
    act.process_state = state
    return act


class TestProcState:
    def test_the_state_of_a_zombie_running_and_gone_process(self, children: list[subprocess.Popen[bytes]]) -> None:
        """read_process_state: Z for an unreaped child, R for this process, None for a reused or gone pid."""
        child = zombie(children)
        start = read_start_time(child.pid)
        assert start is not None
        assert read_process_state(child.pid, start) == "Z"
        assert read_process_state(child.pid, start + 1) is None  # another start time: never another process's state
        own = read_start_time(os.getpid())
        assert own is not None and read_process_state(os.getpid(), own) == "R"
        child.wait()
        assert read_process_state(child.pid, start) is None

    def test_a_name_with_a_parenthesis_cannot_forge_the_state(self, tmp_path: Path) -> None:
        """The state is read after the last ')' of /proc/PID/stat: a process named 'x) Z (' does not choose it."""
        (tmp_path / "7").mkdir()
        fields = ["D", *["0"] * 18, "4242"]  # state, then fields 4-21, then the start time (22)
        (tmp_path / "7" / "stat").write_bytes(b"7 (x) Z (y) " + " ".join(fields).encode() + b" 0 0\n")
        assert read_process_state(7, 4242, tmp_path) == "D"
        (tmp_path / "7" / "stat").write_bytes(b"7 (x) \xff 0\n")
        assert read_process_state(7, 4242, tmp_path) is None

    def test_the_actuator_reads_the_state_before_sending_sigkill_again(self, tmp_path: Path) -> None:
        """For a follow-up the actuator reads /proc first, then signals; a give-up is read, never signalled."""
        calls: list[str] = []
        act = actuator(tmp_path, calls)
        snapshot = Snapshot(t_s=62.5, wall_time_s=0.0, gpus=())
        again, given_up = act.apply(
            [follow_up_decision(2, 1000), follow_up_decision(2, 1000, Rule.VRAM_KILL_GIVEN_UP)], snapshot
        )
        assert calls == ["state", f"signal {signal.SIGKILL}", "state"]
        assert (again.outcome, again.process_state) == (Outcome.APPLIED, "D")
        assert (given_up.outcome, given_up.process_state) == (Outcome.SKIPPED, "D")
        calls.clear()
        plain = replace(follow_up_decision(2, 1000), rule=Rule.VRAM_ESCALATE, kill_sent_s=None)
        assert act.apply([plain], snapshot)[0].process_state is None
        assert calls == [f"signal {signal.SIGKILL}"]  # an ordinary SIGKILL costs no /proc read


def logged(tmp_path: Path, results: Sequence[ActionResult]) -> list[MutableMapping[str, Any]]:
    """The follow-up events the decision log writes for a tick report holding ``results``."""
    governor, _, clock = two_gpu_governor(tmp_path)
    clock.advance(1.0)
    report = replace(governor.step(governor.read()), results=tuple(results))
    with capture_logs() as logs:
        DecisionLog(structlog.get_logger()).observe(report)
    return [e for e in logs if e["event"] in KILL_FOLLOW_UPS]


class TestLog:
    def test_one_error_event_with_what_an_operator_needs(self, tmp_path: Path) -> None:
        """vram_kill_ineffective: an error with gpu, pid, process, class, bytes used, time since SIGKILL, proc state."""
        results = actuator(tmp_path, []).apply([follow_up_decision(2, 1000)], Snapshot(t_s=0, wall_time_s=0, gpus=()))
        (event,) = logged(tmp_path, results)
        assert event["event"] == "vram_kill_ineffective" and event["log_level"] == "error"
        for key, value in {
            "gpu": 0,
            "pid": 2,
            "process": "stuck",
            "class": "secondary",
            "used_bytes": OVER,
            "since_kill_s": 22.5,
            "proc_state": "D",
            "outcome": "applied",
        }.items():
            assert event[key] == value, key
        assert "uninterruptible sleep" in str(event["state_means"])
        sentence = message("vram_kill_ineffective", event)
        assert sentence is not None and sentence.startswith(
            "GPU 0: process 2 (stuck, class secondary) still holds 4GiB 22.5 s after its first SIGKILL (state D, "
        )
        assert sentence.endswith(": SIGKILL sent again")

    def test_the_give_up_is_its_own_error_event(self, tmp_path: Path) -> None:
        """vram_kill_given_up is an error saying no more SIGKILL is sent, with the same process fields."""
        decision = follow_up_decision(2, 1000, Rule.VRAM_KILL_GIVEN_UP)
        results = actuator(tmp_path, []).apply([decision], Snapshot(t_s=0, wall_time_s=0, gpus=()))
        (event,) = logged(tmp_path, results)
        assert (event["event"], event["log_level"], event["proc_state"], event["pid"]) == (
            "vram_kill_given_up",
            "error",
            "D",
            2,
        )
        assert "no more SIGKILL" in str(event["effect"])


# ----------------------------------------------------------------------------- end to end, a real zombie


def child_marked(children: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """A child of class secondary (its command line carries the marker) that ignores SIGTERM."""
    return spawn(children, ZOMBIE, "secondary-marker")


class TestRealZombie:
    def test_a_zombie_over_budget_is_reported_killed_again_and_given_up_once(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """A SIGKILLed child listed as a zombie: 3 retries, 1 give-up (state Z, errors, counted), then 10 min quiet."""
        h = Harness(tmp_path, classes_toml())  # secondary: 3 GiB, grace 10 s, kill after 5 s
        child = child_marked(children)
        h.daemon.start()
        h.backend.attach_process(0, child.pid, OVER)  # not h.attach: the test never reaps it, NVML keeps listing it
        with capture_logs() as logs:
            h.step(20)
            start = read_start_time(child.pid)
            assert start is not None and read_process_state(child.pid, start) == "Z"  # SIGKILLed, not reaped
            h.step(600)
        events = [e for e in logs if e["event"] in ("process_signalled", "vram_kill_ineffective", "vram_kill_given_up")]
        assert [(e["event"], e.get("signal")) for e in events] == [
            ("process_signalled", "SIGTERM"),
            ("process_signalled", "SIGKILL"),
            *[("vram_kill_ineffective", "SIGKILL")] * KILL_RETRIES_MAX,
            ("vram_kill_given_up", None),
        ]
        followed = events[2:]
        assert all(e["proc_state"] == "Z" and e["log_level"] == "error" and e["pid"] == child.pid for e in followed)
        assert [e["outcome"] for e in followed] == ["applied"] * KILL_RETRIES_MAX + ["skipped"]
        assert [e["since_kill_s"] for e in followed] == [5.0 * n for n in range(1, KILL_RETRIES_MAX + 2)]
        page = generate_latest(build_registry(lambda: h.daemon.published)).decode()
        sample = 'gpu_governor_decisions_total{action="sigkill",gpu="0",rule="vram_kill_ineffective",uuid="%s"} 3.0'
        published = h.daemon.published
        assert published is not None
        uuid = published.gpus[0].info.uuid
        assert sample % uuid in page
        assert 'rule="vram_kill_given_up"' in page
        assert (
            'gpu_governor_process_actions_total{action="over_budget",class="secondary",outcome="reported"} 1.0' in page
        )

    def test_a_zombie_on_two_gpus_gets_one_retry_per_cadence_not_one_per_gpu(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """Over budget on two GPUs, a zombie is reported and sent SIGKILL again once per kill_after_s, not per GPU."""
        governor, backend, clock = two_gpu_governor(tmp_path)
        child = child_marked(children)
        backend.on[0][child.pid] = backend.on[1][child.pid] = OVER
        results: list[ActionResult] = []
        for _ in range(120):
            clock.advance(1.0)
            results += governor.step(governor.read()).results
            time.sleep(0.01)
        ineffective = [r for r in results if r.decision.rule == "vram_kill_ineffective"]
        given_up = [r for r in results if r.decision.rule == "vram_kill_given_up"]
        assert len(ineffective) == KILL_RETRIES_MAX and len(given_up) == 1
        times = [r.decision.t_s for r in ineffective]
        assert all(b - a >= 5.0 for a, b in itertools.pairwise(times))
        assert all(r.outcome is Outcome.APPLIED and r.process_state == "Z" for r in ineffective)
        kills = [r for r in results if r.decision.action is Action.SIGNAL_KILL and r.outcome is Outcome.APPLIED]
        assert len(kills) == 1 + KILL_RETRIES_MAX
