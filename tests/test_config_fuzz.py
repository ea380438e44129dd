"""Corrupt config documents: every one is either a Config that plans and renders back to itself, or a ConfigError."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from governor.config import SCHEMA, check_resolved, parse_config, parse_toml, render_config
from governor.core import build_plans
from governor.errors import ConfigError
from governor.model import GpuInfo
from tests.support import Branch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "config" / "governor.toml", *sorted((ROOT / "config" / "examples").glob("*.toml"))]
DOCS = [(path.name, parse_toml(path.read_bytes(), str(path))) for path in SHIPPED]
GiB = 2**30
CARDS = (
    (
        GpuInfo(
            0,
            "GPU-a",
            "NVIDIA GeForce RTX 4070",
            "00000000:01:00.0",
            100.0,
            220.0,
            200.0,
            90.0,
            100.0,
            12 * GiB,
            "550",
            1,
            30.0,
            100.0,
        ),
    ),
    (
        GpuInfo(
            0,
            "GPU-b",
            "NVIDIA H100 80GB HBM3",
            "00000000:02:00.0",
            200.0,
            700.0,
            700.0,
            None,
            None,
            80 * GiB,
            "580",
            None,
        ),
    ),
    (GpuInfo(0, "GPU-c", "no readings at all"),),
    (
        GpuInfo(0, "GPU-d", "fixed limit", None, 150.0, 150.0, 150.0, 1.0, 2.0, 1, None, 3, 0.0, 0.0),
        GpuInfo(1, "GPU-e", "odd range", None, 0.0, 1e6, 5.0, None, None, 0, None, 2, 50.0, 40.0),
    ),
)
"""GPUs of every shape a backend may report: a desktop card, a data-center card, one that
reports nothing, odd ranges."""
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True)  # the same examples each run
MIN_SHARE = 0.1
"""Each outcome (accepted, refused) must happen in at least this share of the examples."""
KEYS = sorted(
    {
        "enabled",
        "ladder_w",
        "floor_w",
        "target_c",
        "mode",
        "curve",
        "power_budget_w",
        "budget",
        "cmdline",
        "cgroup",
        "user",
        "port",
        "level",
        "dry_run",
        "poll_interval_s",
        "index",
        "uuid",
        "name",
        *SCHEMA,
    }
)

scalars = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(
        [
            "",
            "x",
            "200W",
            "90%",
            "-5%",
            "1e3%",
            "nanW",
            "1e400",
            "10 s",
            "5m",
            "1e308GiB",
            "3GiB",
            "0B",
            "-1GiB",
            "(a+)+$",
            "[",
            "*.service",
            "\x00",
            "é" * 50,
            "a" * 5000,
        ]
    ),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
    max_leaves=8,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path in a parsed TOML document (table keys and array indexes)."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


@st.composite
def corrupt_documents(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A shipped config with one or two of its values replaced, nudged, deleted or given a new key."""
    name, base = draw(st.sampled_from(DOCS))
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 2))):
        paths = list(_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["nudge", "delete", "replace", "add", "nudge", "delete", "nudge"]))
        target = parent[path[-1]]
        if op == "nudge" and isinstance(target, (int, float)) and not isinstance(target, bool):
            # a plausible number where one belongs: reaches the checks between keys and the plans
            parent[path[-1]] = draw(st.integers(-5, 1000) if isinstance(target, int) else st.floats(-50.0, 1000.0))
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == "add" and isinstance(target, dict):
            target[draw(st.sampled_from(KEYS))] = draw(values)
        else:
            parent[path[-1]] = draw(values)
    return name, doc


def test_a_corrupt_config_is_refused_or_planned_and_rendered_back() -> None:
    """A corrupt shipped config is a ConfigError naming the file, or a config every GPU shape
    plans and whose rendering parses back to it; both outcomes happen often."""
    accepted = Branch("a corrupt document accepted")

    @SETTINGS
    @given(corrupt_documents())
    def check(case: tuple[str, dict[str, Any]]) -> None:
        name, doc = case
        try:
            config = parse_config(doc, name)
        except ConfigError as exc:
            assert str(exc).startswith(name)
            accepted.saw(False)
            return
        accepted.saw(True)
        for gpus in CARDS:
            build_plans(config, gpus)
            check_resolved(config, gpus)
        assert parse_config(parse_toml(render_config(config).encode(), "rendered"), name) == config

    check()
    accepted.require(MIN_SHARE)
    assert accepted.hits <= (1 - MIN_SHARE) * accepted.examples, "too few corrupt documents were refused"


@pytest.mark.parametrize(
    "section,key",
    [
        (None, "state_dir"),
        (None, "runtime_dir"),
        *(("metrics", k) for k in ("web_config_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file")),
        *(("simulation", k) for k in ("profile", "scenario", "state_file", "processes_file")),
    ],
)
@pytest.mark.parametrize("bad", ["/etc/x\x00y", "/" + "a" * 4095])
def test_a_path_the_kernel_cannot_take_is_a_config_error(section: str | None, key: str, bad: str) -> None:
    """A path with a NUL character or over PATH_MAX is a ConfigError naming the key, not open()'s ValueError."""
    doc: dict[str, Any] = {key: bad} if section is None else {section: {key: bad}}
    with pytest.raises(ConfigError) as raised:
        parse_config(doc, "/etc/gpu-governor/governor.toml")
    shown = f"{section}.{key}" if section else key
    assert shown in str(raised.value)
    assert "NUL" in str(raised.value)


def test_an_empty_match_table_renders_back() -> None:
    """A class with an empty match table (it never matches) renders as written, so the effective config parses back."""
    doc = {"class": [{"name": "never", "budget": "1GiB", "match": {}}]}
    config = parse_config(doc, "x.toml")
    assert parse_config(parse_toml(render_config(config).encode(), "rendered"), "x.toml") == config
