"""ProcessFacts lives in the model: identity (who the process is) apart from classification (its class)."""

from __future__ import annotations

from governor import model, processes
from governor.classes import ProcessClass, ProcessMatch, VramPolicy
from governor.model import Classification, ProcessFacts, ProcessIdentity

GiB = 2**30
WHO = ProcessIdentity(
    pid=4242,
    start_time=1000,
    name="trainer",
    exe="/usr/bin/python3.11",
    cmdline="python3 train.py",
    uid=1000,
    user="alice",
    cgroup="/system.slice/train.service",
    unit="train.service",
    slices=("system.slice",),
    kernel_thread=False,
)


def test_old_import_path_is_the_model_type() -> None:
    """governor.processes re-exports the model's ProcessFacts, not a copy."""
    assert processes.ProcessFacts is model.ProcessFacts


def test_attributes_read_through_both_parts() -> None:
    """The names callers use (pid, user, unit, exe_name, klass, why, protected ...) read the two parts."""
    facts = ProcessFacts(WHO, Classification("batch", "class batch: user alice", protected=None))
    assert (facts.pid, facts.start_time, facts.user, facts.unit, facts.exe_name) == (
        4242,
        1000,
        "alice",
        "train.service",
        "python3.11",
    )
    assert (facts.klass, facts.why, facts.protected, facts.unresolved) == (
        "batch",
        "class batch: user alice",
        None,
        False,
    )


def test_reclassifying_keeps_the_identity() -> None:
    """classified_as changes only the classification; seen_as only the identity."""
    facts = ProcessFacts(WHO, Classification("batch", "test"))
    again = facts.classified_as(protected="PID 1")
    assert again.identity is WHO and again.protected == "PID 1" and again.klass == "batch"
    moved = facts.seen_as(newer_than_listing=True)
    assert moved.classification is facts.classification and moved.newer_than_listing and moved.pid == 4242


def test_flat_constructor_matches_the_parts() -> None:
    """ProcessFacts.of (the former flat field order) builds the same facts as the two parts."""
    flat = ProcessFacts.of(
        4242, 1000, "trainer", "/usr/bin/python3.11", "python3 train.py", 1000, "alice",
        "/system.slice/train.service", "train.service", ("system.slice",), False, "batch", "test", None,
    )  # fmt: skip
    assert flat == ProcessFacts(WHO, Classification("batch", "test"))


def test_classified_classifies_an_identity() -> None:
    """processes.classified turns a bare identity into facts: class, why and protection from the policy."""
    batch = ProcessClass("batch", ProcessMatch(user="alice"), budget_bytes=GiB)
    facts = processes.classified(WHO, VramPolicy(classes=(batch,)), own_pid=1)
    assert facts.identity is WHO
    assert facts.klass == "batch" and facts.why == "class batch: user alice" and facts.protected is None
    own = processes.classified(WHO, VramPolicy(classes=(batch,)), own_pid=4242)
    assert own.protected == "the governor itself"
