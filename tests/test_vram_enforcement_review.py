"""Adversarial review of per-process VRAM enforcement: flapping, several GPUs, PID namespaces, ties."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from governor.backends._nvml_procs import ProcessLister
from governor.classes import ProcessAction, ProcessClass, ProcessMatch, VramPolicy
from governor.clock import VirtualClock
from governor.core import Governor
from governor.model import Action, ActionResult, Decision, GpuReading, Outcome, ProcessReading
from governor.processes import HOST_PID_NAMESPACE, ProcessFacts, ProcessInspector, foreign_pid_namespace
from governor.rules.vram import KILL_FOLLOW_UPS, REMEMBERED_OFFENDERS_MAX, VramState, evaluate_vram
from tests.builders import GiB, listing, process_facts, spawn, two_gpu_governor

# ----------------------------------------------------------------------------- the pure rule

SECONDARY = ProcessClass(
    "secondary",
    ProcessMatch(user="u"),
    3 * GiB,
    priority=50,
    action=ProcessAction.TERMINATE,
    grace_s=30,
    kill_after_s=10,
)
POLICY = VramPolicy(reserve_bytes=2 * GiB, classes=(SECONDARY,), cooldown_s=20)


def reading(*procs: tuple[int, int | None], used: int = 6 * GiB, total: int = 80 * GiB) -> GpuReading:
    """GPU-0 listing ``procs`` as (pid, used bytes), ``used`` of ``total`` bytes in use."""
    return listing(*procs, used=used, total=total)


def table(*pids: int, start: int = 1000) -> dict[int, ProcessFacts]:
    """Facts of ``pids``, all of class secondary."""
    return {p: process_facts(p, "secondary", start_time=start, name=f"p{p}") for p in pids}


def run(
    ticks: Sequence[tuple[float, GpuReading]], facts: dict[int, ProcessFacts], policy: VramPolicy = POLICY
) -> tuple[VramState, list[Decision]]:
    """Every tick through the rule; the last state and every decision."""
    state = VramState()
    out: list[Decision] = []
    for t, r in ticks:
        state, decisions = evaluate_vram(r, facts, policy, state, t)
        out.extend(decisions)
    return state, out


def escalation(decisions: Sequence[Decision]) -> list[Decision]:
    """The signals of the escalation (SIGTERM, SIGKILL), without the SIGKILLs sent again to a process still
    listed after its SIGKILL (these processes never die: tests/test_vram_kill_ineffective.py)."""
    return [d for d in decisions if d.action is not Action.NONE and d.rule not in KILL_FOLLOW_UPS]


def kinds(decisions: Sequence[Decision]) -> list[tuple[str, Action, float]]:
    """(rule, action, time) of each decision."""
    return [(str(d.rule), d.action, d.t_s) for d in decisions]


class TestFlapping:
    def test_hovering_at_the_budget_edge_is_reported_once_and_terminated_once(self) -> None:
        """A process that crosses its budget every other tick is reported once and SIGTERMed after its grace."""
        ticks = [(t, reading((2, 4 * GiB if t % 2 == 0 else 3 * GiB))) for t in range(0, 60)]
        _, decisions = run(ticks, table(2))
        reports = [d for d in decisions if d.rule == "vram_over_budget"]
        terms = [d for d in decisions if d.action is Action.SIGNAL_TERM]
        assert len(reports) == 1
        assert [d.t_s for d in terms] == [30]

    def test_a_dip_under_budget_after_sigterm_does_not_restart_the_escalation(self) -> None:
        """A SIGTERM-ignoring process that dips under budget for a tick still gets SIGKILL kill_after after SIGTERM."""
        ticks = [(t, reading((2, 2 * GiB if t == 33 else 4 * GiB))) for t in range(0, 70)]
        _, decisions = run(ticks, table(2))
        signals = [(d.action, d.t_s) for d in escalation(decisions)]
        assert signals == [(Action.SIGNAL_TERM, 30), (Action.SIGNAL_KILL, 40)]

    def test_unreported_usage_after_sigterm_does_not_restart_the_escalation(self) -> None:
        """A tick where NVML cannot say the usage (None) is not a tick under budget: SIGKILL stays due."""
        ticks = [(t, reading((2, None if t == 33 else 4 * GiB))) for t in range(0, 70)]
        _, decisions = run(ticks, table(2))
        signals = [(d.action, d.t_s) for d in escalation(decisions)]
        assert signals == [(Action.SIGNAL_TERM, 30), (Action.SIGNAL_KILL, 40)]

    def test_a_tick_off_the_listing_after_sigterm_does_not_restart_the_escalation(self) -> None:
        """A process missing from one listing (its context re-created) still gets SIGKILL on time."""
        ticks = [(t, reading() if t == 33 else reading((2, 4 * GiB))) for t in range(0, 70)]
        _, decisions = run(ticks, table(2))
        signals = [(d.action, d.t_s) for d in escalation(decisions)]
        assert signals == [(Action.SIGNAL_TERM, 30), (Action.SIGNAL_KILL, 40)]

    def test_a_whole_grace_within_budget_starts_afresh(self) -> None:
        """Within budget for a whole grace, a process over budget again is reported anew and gets a new grace."""
        ticks = [(t, reading((2, 4 * GiB if t < 10 or t >= 50 else 2 * GiB))) for t in range(0, 90)]
        _, decisions = run(ticks, table(2))
        assert [(r, t) for r, a, t in kinds(decisions)] == [
            ("vram_over_budget", 0),
            ("vram_over_budget", 50),
            ("vram_enforce", 80),
        ]

    def test_offenders_of_gone_processes_are_forgotten(self) -> None:
        """Escalation state of processes that left the GPU is dropped once their grace has passed."""
        ticks = [(t, reading((100 + t, 4 * GiB))) for t in range(0, 50)]
        facts = table(*range(100, 150))
        state, _ = run(ticks, facts)
        assert len(state.offenders) <= 31  # the last grace (30 s) of one-tick offenders, no more
        state, _ = evaluate_vram(reading(), facts, POLICY, state, 200)
        assert dict(state.offenders) == {}

    def test_remembered_offenders_are_bounded(self) -> None:
        """However many processes leave at once, the offenders not over budget now are capped per GPU."""
        many = REMEMBERED_OFFENDERS_MAX + 500
        facts = table(*range(10, 10 + many))
        crowd = reading(*((p, 4 * GiB) for p in range(10, 10 + many)))
        state, _ = evaluate_vram(crowd, facts, POLICY, VramState(), 0)
        assert len(state.offenders) == many
        state, _ = evaluate_vram(reading(), facts, POLICY, state, 1)
        assert len(state.offenders) == REMEMBERED_OFFENDERS_MAX


class TestVictimChoice:
    def test_equal_candidates_give_the_same_victim_whatever_the_listing_order(self) -> None:
        """Under pressure, two equal offenders: the newest (latest start, then highest pid) is chosen either way."""
        facts = {
            7: process_facts(7, "secondary", start_time=5000, name="p7"),
            9: process_facts(9, "secondary", start_time=4000, name="p9"),
        }
        chosen = []
        for order in (((7, 4 * GiB), (9, 4 * GiB)), ((9, 4 * GiB), (7, 4 * GiB))):
            tight = reading(*order, used=79 * GiB)
            _, decisions = run([(0, tight)], facts)
            chosen.append([d.pid for d in decisions if d.action is Action.SIGNAL_TERM])
        assert chosen == [[7], [7]]


# ----------------------------------------------------------------------------- PID namespaces


def proc_view(tmp: Path, namespace: str | None, pids: Sequence[int]) -> Path:
    """A /proc whose ``self/ns/pid`` reads ``namespace`` (absent when None) and whose ``pids`` are real ones."""
    proc = tmp / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    if namespace is not None:
        (proc / "self" / "ns" / "pid").symlink_to(namespace)
    for pid in pids:
        (proc / str(pid)).symlink_to(f"/proc/{pid}")
    return proc


class TestPidNamespace:
    def test_the_host_namespace_is_recognised(self, tmp_path: Path) -> None:
        """A governor in the host's PID namespace reads NVML's PIDs as its own: no problem reported."""
        assert foreign_pid_namespace(proc_view(tmp_path, HOST_PID_NAMESPACE, ())) is None

    def test_a_container_namespace_is_reported(self, tmp_path: Path) -> None:
        """A governor in a PID namespace of its own (a container) is told NVML's host PIDs are not its PIDs."""
        why = foreign_pid_namespace(proc_view(tmp_path, "pid:[4026532999]", ()))
        assert why is not None and "PID namespace" in why

    def test_an_unreadable_namespace_is_not_trusted(self, tmp_path: Path) -> None:
        """When the governor cannot tell its PID namespace, the listed PIDs are not trusted either."""
        why = foreign_pid_namespace(proc_view(tmp_path, None, ()))
        assert why is not None and "cannot tell" in why

    def test_the_running_test_reads_its_own_namespace(self) -> None:
        """The real /proc answers: the check returns either None or a reason, and never raises."""
        real = os.readlink("/proc/self/ns/pid")
        assert (foreign_pid_namespace() is None) == (real == HOST_PID_NAMESPACE)

    def test_processes_listed_by_host_pid_in_a_container_are_never_signalled(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """In a foreign PID namespace, the process under a listed PID is protected: reported, never signalled."""
        child = spawn(children, "import time\nprint('ready', flush=True)\ntime.sleep(120)", "ns-marker")
        proc = proc_view(tmp_path, "pid:[4026532999]", (child.pid,))
        klass = ProcessClass("victim", ProcessMatch(user=str(os.getuid())), 1 * GiB, grace_s=0, kill_after_s=0)
        policy = VramPolicy(classes=(klass,))
        inspector = ProcessInspector(proc=proc, foreign_pids=foreign_pid_namespace(proc))
        facts = {child.pid: inspector.facts(child.pid, None, policy)}
        assert facts[child.pid].klass == "victim"
        why = facts[child.pid].protected
        assert why is not None and "PID namespace" in why
        gpu = GpuReading(
            index=0,
            uuid="GPU-0",
            memory_used_bytes=70 * GiB,
            memory_total_bytes=80 * GiB,
            processes=(ProcessReading(child.pid, 4 * GiB),),
        )
        state, decisions = VramState(), []
        for t in range(0, 10):
            state, more = evaluate_vram(gpu, facts, policy, state, t)
            decisions.extend(more)
        assert decisions and all(d.action is Action.NONE for d in decisions)

    def test_a_listed_pid_holding_a_gpu_device_is_trusted_in_a_container(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """In a foreign PID namespace a newer driver lists the container's own PIDs: the process found under
        one that holds an NVIDIA device open (here a stand-in device file) is enforced, the one that holds
        none stays protected."""
        device = tmp_path / "dev-nvidia0"
        device.write_text("")
        holder = spawn(
            children, f"import time\nf = open({str(device)!r})\nprint('ready', flush=True)\ntime.sleep(120)", "gpu-user"
        )
        idle = spawn(children, "import time\nprint('ready', flush=True)\ntime.sleep(120)", "ns-marker")
        proc = proc_view(tmp_path, "pid:[4026532999]", (holder.pid, idle.pid))
        klass = ProcessClass("victim", ProcessMatch(user=str(os.getuid())), 1 * GiB)
        inspector = ProcessInspector(proc=proc, foreign_pids=foreign_pid_namespace(proc))
        inspector.gpu_device_prefix = str(tmp_path / "dev-nvidia")
        policy = VramPolicy(classes=(klass,))
        assert inspector.facts(holder.pid, None, policy).protected is None
        why = inspector.facts(idle.pid, None, policy).protected
        assert why is not None and "holds no" in why and "PID namespace" in why

    def test_own_namespace_pids_stay_enforced(self, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
        """In the host's PID namespace the inspector protects nothing for the namespace's sake."""
        child = spawn(children, "import time\nprint('ready', flush=True)\ntime.sleep(120)", "ns-marker")
        proc = proc_view(tmp_path, HOST_PID_NAMESPACE, (child.pid,))
        klass = ProcessClass("victim", ProcessMatch(user=str(os.getuid())), 1 * GiB)
        inspector = ProcessInspector(proc=proc, foreign_pids=foreign_pid_namespace(proc))
        assert inspector.facts(child.pid, None, VramPolicy(classes=(klass,))).protected is None


# ----------------------------------------------------------------------------- one process on two GPUs

COUNT_TERMS = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: print('term', flush=True))\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
    "time.sleep(120)\n"
)
"""A child that ignores SIGTERM but prints ``term`` for each one it gets."""


def tick(governor: Governor, clock: VirtualClock, seconds: int) -> list[ActionResult]:
    """One step per virtual second; the signal results."""
    out: list[ActionResult] = []
    for _ in range(seconds):
        clock.advance(1.0)
        out += [r for r in governor.step(governor.read()).results if r.decision.action is not Action.NONE]
        time.sleep(0.02)  # let real signals land
    return out


def terms_seen(child: subprocess.Popen[bytes]) -> int:
    """How many SIGTERMs the counting child printed (it is killed first)."""
    time.sleep(0.3)
    if child.poll() is None:
        child.kill()
    out, _ = child.communicate(timeout=10)
    return out.decode().split().count("term")


class TestTwoGpus:
    def test_over_budget_on_two_gpus_at_once_gets_one_sigterm_and_one_sigkill(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """A process over budget on two GPUs is sent one SIGTERM, then one SIGKILL, not one per GPU."""
        governor, backend, clock = two_gpu_governor(tmp_path)
        child = spawn(children, COUNT_TERMS, "secondary-marker")
        backend.on[0][child.pid] = backend.on[1][child.pid] = 4 * GiB
        results = tick(governor, clock, 13)
        applied = [r for r in results if r.outcome is Outcome.APPLIED]
        assert [r.decision.action for r in applied] == [Action.SIGNAL_TERM]
        assert child.poll() is None
        results = tick(governor, clock, 6)
        assert [r.decision.action for r in results if r.outcome is not Outcome.SKIPPED] == [Action.SIGNAL_KILL]
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert terms_seen(child) == 1

    def test_over_budget_on_a_second_gpu_later_is_not_terminated_again(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """A process SIGTERMed for one GPU and over budget on another later gets no second SIGTERM."""
        governor, backend, clock = two_gpu_governor(tmp_path)
        child = spawn(children, COUNT_TERMS, "secondary-marker")
        backend.on[0][child.pid] = 4 * GiB
        tick(governor, clock, 3)
        backend.on[1][child.pid] = 4 * GiB
        results = tick(governor, clock, 12)  # GPU 0's grace ends at 10 s, GPU 1's at 13 s; SIGKILL due at 16 s
        assert [r.decision.action for r in results if r.outcome is Outcome.APPLIED] == [Action.SIGNAL_TERM]
        assert child.poll() is None
        assert terms_seen(child) == 1


# ----------------------------------------------------------------------------- dry run, then live


class TestDryRunThenLive:
    def test_a_would_be_sigterm_is_not_taken_for_a_real_one(self) -> None:
        """After a reload from dry run to live, the first real signal is a SIGTERM, SIGKILL only kill_after later."""
        facts = table(2)
        state = VramState()
        dry = VramPolicy(reserve_bytes=2 * GiB, classes=(SECONDARY,), cooldown_s=20, dry_run=True)
        for t in range(0, 36):
            state, decisions = evaluate_vram(reading((2, 4 * GiB)), facts, dry, state, t)
            assert all(d.dry_run for d in decisions if d.action is not Action.NONE)
        live: list[Decision] = []
        for t in range(36, 120):
            state, decisions = evaluate_vram(reading((2, 4 * GiB)), facts, POLICY, state, t)
            live.extend(escalation(decisions))
        assert [d.action for d in live] == [Action.SIGNAL_TERM, Action.SIGNAL_KILL]
        assert not any(d.dry_run for d in live)
        assert live[1].t_s - live[0].t_s >= SECONDARY.kill_after_s

    def test_a_would_be_sigkill_is_not_taken_for_a_real_one(self) -> None:
        """A kill-class process only 'would be' SIGKILLed in dry run is really SIGKILLed once the run is live."""
        killer = ProcessClass("secondary", ProcessMatch(user="u"), 3 * GiB, action=ProcessAction.KILL, grace_s=30)
        facts = table(2)
        state = VramState()
        dry = VramPolicy(classes=(killer,), cooldown_s=20, dry_run=True)
        for t in range(0, 36):
            state, _ = evaluate_vram(reading((2, 4 * GiB)), facts, dry, state, t)
        live: list[Decision] = []
        for t in range(36, 120):
            state, decisions = evaluate_vram(reading((2, 4 * GiB)), facts, replace(dry, dry_run=False), state, t)
            live.extend(escalation(decisions))
        assert [(d.action, d.dry_run) for d in live] == [(Action.SIGNAL_KILL, False)]


# ----------------------------------------------------------------------------- the NVML process listing


class TestNvmlListing:
    def test_a_failed_compute_listing_is_unknown_not_empty(self, tmp_path: Path) -> None:
        """Compute processes unreadable this tick: the listing is unknown (None), not an idle GPU's empty one."""
        assert ProcessLister(tmp_path).processes(None, []) is None

    def test_a_failed_compute_listing_hides_no_process_behind_graphics_ones(self, tmp_path: Path) -> None:
        """With the compute list unreadable, the graphics processes alone are not taken for the whole listing."""
        graphics = [SimpleNamespace(pid=300, usedGpuMemory=1 << 20)]
        assert ProcessLister(tmp_path).processes(None, graphics) is None

    def test_an_unsupported_graphics_listing_keeps_the_compute_one(self, tmp_path: Path) -> None:
        """Graphics processes unreadable (data-centre cards): the compute processes are the listing."""
        compute = [SimpleNamespace(pid=100, usedGpuMemory=2 << 30)]
        listed = ProcessLister(tmp_path).processes(compute, None)
        assert listed == (ProcessReading(pid=100, used_memory_bytes=2 << 30, name=None),)
