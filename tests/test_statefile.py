"""The three durable stores through their shared StateFile: bad files at start, failed saves, what is kept."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from governor import statefile
from governor.fanstate import FAN_STATE_FILE_NAME, FanControl
from governor.rules.units import StoppedUnit
from governor.state import STATE_FILE_NAME, OriginalLimits
from governor.statefile import MAX_REPORTED_PROBLEMS, StateFile
from governor.unitstate import FILE_NAME as UNITS_FILE_NAME
from governor.unitstate import StoppedUnitsStore

UNIT_ENTRY = {
    "class": "secondary",
    "reason": "memory_pressure",
    "gpus": ["GPU-a"],
    "stopped_at_s": 1_700_000_000.0,
    "resume_after_s": 60.0,
}


def _stopped(unit: str) -> StoppedUnit:
    return StoppedUnit(unit, "secondary", "over_budget", ("GPU-a",), 1.0, 0.0)


def _open_limits(state_dir: Path | None) -> tuple[StateFile, list[str]]:
    store = OriginalLimits(state_dir)
    return store, [u for u, _ in store.items()]


def _open_fans(state_dir: Path | None) -> tuple[StateFile, list[str]]:
    store = FanControl(state_dir)
    return store, [u for u, _ in store.items()]


def _open_units(state_dir: Path | None) -> tuple[StateFile, list[str]]:
    store = StoppedUnitsStore(state_dir)
    return store, sorted(store.load())


def _change(store: StateFile, i: int) -> None:
    """One change that makes ``store`` save (a new entry ``i``)."""
    if isinstance(store, OriginalLimits):
        store.remember(f"GPU-{i}", 100.0 + i)
    elif isinstance(store, FanControl):
        store.remember(f"GPU-{i}", 1)
    else:
        assert isinstance(store, StoppedUnitsStore)
        store.save({f"u{i}.service": _stopped(f"u{i}.service")})


@dataclass(frozen=True)
class Kind:
    """One store: its file name, how to open it (the store and the keys it loaded), and a
    document with one good entry (``good``) and one bad one."""

    name: str
    file_name: str
    open: Callable[[Path | None], tuple[StateFile, list[str]]]
    mixed: dict[str, Any]
    good: str

    def __repr__(self) -> str:
        return self.name


KINDS = [
    Kind(
        "original-limits",
        STATE_FILE_NAME,
        _open_limits,
        {"version": 2, "original_power_limits_w": {"GPU-a": 200.0, "GPU-b": "two hundred"}},
        "GPU-a",
    ),
    Kind(
        "fan-control",
        FAN_STATE_FILE_NAME,
        _open_fans,
        {"version": 1, "manual_fans": {"GPU-a": 2, "GPU-b": 99}},
        "GPU-a",
    ),
    Kind(
        "stopped-units",
        UNITS_FILE_NAME,
        _open_units,
        {"version": 1, "units": {"comfyui.service": UNIT_ENTRY, "sshd.service": UNIT_ENTRY}},
        "comfyui.service",
    ),
]


@pytest.mark.parametrize("kind", KINDS, ids=repr)
class TestEveryStore:
    def test_a_bad_entry_is_named_the_rest_kept_and_the_file_kept_aside(self, tmp_path: Path, kind: Kind) -> None:
        """One bad entry: the warning names the file and what was expected, the good entry is
        kept, and the file's bytes are kept as <name>.corrupt."""
        path = tmp_path / kind.file_name
        raw = json.dumps(kind.mixed).encode()
        path.write_bytes(raw)
        store, loaded = kind.open(tmp_path)
        assert store.load_warning is not None
        assert str(path) in store.load_warning and "expected" in store.load_warning
        assert "valid entries are kept" in store.load_warning
        assert loaded == [kind.good]
        assert store.set_aside_to == store.corrupt_path == tmp_path / (kind.file_name + ".corrupt")
        assert (tmp_path / (kind.file_name + ".corrupt")).read_bytes() == raw

    @pytest.mark.parametrize("content", [b"{", b"\xff\xfe", b"[]", b'{"version": 99}'])
    def test_an_unusable_file_never_stops_the_start(self, tmp_path: Path, kind: Kind, content: bytes) -> None:
        """Not JSON, not UTF-8, the wrong shape or version: an empty store, a warning naming the file, a copy kept."""
        (tmp_path / kind.file_name).write_bytes(content)
        store, loaded = kind.open(tmp_path)
        assert loaded == [] and store.load_warning is not None
        assert str(tmp_path / kind.file_name) in store.load_warning
        assert "ignored" in store.load_warning
        assert (tmp_path / (kind.file_name + ".corrupt")).read_bytes() == content

    def test_a_directory_in_its_place_is_moved_aside(self, tmp_path: Path, kind: Kind) -> None:
        """A directory where the file should be is refused unread and renamed to <name>.corrupt."""
        (tmp_path / kind.file_name).mkdir()
        store, _ = kind.open(tmp_path)
        assert store.load_warning is not None and "not a regular file" in store.load_warning
        assert (tmp_path / (kind.file_name + ".corrupt")).is_dir() and not (tmp_path / kind.file_name).exists()

    def test_failed_saves_are_counted_and_named_until_one_succeeds(self, tmp_path: Path, kind: Kind) -> None:
        """A state directory that cannot be created: each failed save counts and last_error names the
        file; once it can be, the next save clears last_error."""
        (tmp_path / "blocker").write_text("a file where the directory should be")
        store, _ = kind.open(tmp_path / "blocker")
        _change(store, 1)
        assert store.write_errors == 1 and str(tmp_path / "blocker" / kind.file_name) in (store.last_error or "")
        assert "cannot save" in (store.last_error or "")
        (tmp_path / "blocker").unlink()
        _change(store, 2)
        assert store.last_error is None and store.write_errors == 1
        assert (tmp_path / "blocker" / kind.file_name).is_file()

    def test_without_a_directory_nothing_is_read_or_written(self, tmp_path: Path, kind: Kind) -> None:
        """state_dir None: no path, no warning, no error, whatever changes."""
        store, _ = kind.open(None)
        _change(store, 1)
        assert (store.path, store.load_warning, store.last_error, store.write_errors) == (None, None, None, 0)


class TestLoadWarning:
    def test_many_problems_are_cut_and_counted(self, tmp_path: Path) -> None:
        """Eight bad entries: the first five are named, the rest counted."""
        bad = {f"GPU-{i}": "x" for i in range(8)}
        (tmp_path / STATE_FILE_NAME).write_text(json.dumps({"version": 2, "original_power_limits_w": bad}))
        warning = OriginalLimits(tmp_path).load_warning or ""
        assert warning.count("expected a number of watts") == MAX_REPORTED_PROBLEMS
        assert f"and {8 - MAX_REPORTED_PROBLEMS} more" in warning


class TestStoppedUnitsSave:
    def test_returning_to_what_the_file_holds_clears_the_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A save that failed, then the list back to what the file already holds: nothing to write,
        and last_error no longer claims the list is unsaved (a stale error refused every stop)."""
        store = StoppedUnitsStore(tmp_path / "state")
        first = {"a.service": _stopped("a.service")}
        store.save(first)

        def disk_full(path: Path, body: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(statefile, "write_state", disk_full)
            store.save({**first, "b.service": _stopped("b.service")})
        assert store.last_error is not None and "No space left" in store.last_error
        store.save(first)
        assert store.last_error is None and store.write_errors == 1
        assert sorted(json.loads((tmp_path / "state" / UNITS_FILE_NAME).read_text())["units"]) == ["a.service"]
