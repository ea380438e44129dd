"""OriginalLimits: atomic persistence, tolerant loading, working on when the disk fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from governor.state import STATE_FILE_NAME, OriginalLimits


def on_disk(state_dir: Path) -> dict[str, float]:
    """The limits in the state file, parsed as JSON (fails the test if it is not valid JSON)."""
    data = json.loads((state_dir / STATE_FILE_NAME).read_text(encoding="utf-8"))
    assert data["version"] == 2
    limits: dict[str, float] = data["original_power_limits_w"]
    return limits


class TestPersistence:
    """Every change is written atomically and survives a new instance."""

    def test_file_valid_after_each_change(self, tmp_path: Path) -> None:
        """After every remember and forget the file holds exactly the in-memory entries as JSON."""
        store = OriginalLimits(tmp_path)
        store.remember("GPU-a", 200.0)
        assert on_disk(tmp_path) == {"GPU-a": 200.0}
        store.remember("GPU-b", 700.0)
        assert on_disk(tmp_path) == {"GPU-a": 200.0, "GPU-b": 700.0}
        store.forget("GPU-a")
        assert on_disk(tmp_path) == {"GPU-b": 700.0}
        store.forget("GPU-b")
        assert on_disk(tmp_path) == {}

    def test_no_temporary_files_left(self, tmp_path: Path) -> None:
        """Only the state file remains in the directory after several writes."""
        store = OriginalLimits(tmp_path)
        for i in range(5):
            store.remember(f"GPU-{i}", 100.0 + i)
        store.forget("GPU-0")
        assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE_NAME]

    def test_reload_in_new_instance(self, tmp_path: Path) -> None:
        """A new store over the same directory loads what the last one saved."""
        OriginalLimits(tmp_path).remember("GPU-a", 250.5)
        again = OriginalLimits(tmp_path)
        assert again.items() == [("GPU-a", 250.5)]
        assert again.load_warning is None

    def test_first_value_is_the_original(self, tmp_path: Path) -> None:
        """remember() keeps the first value and ignores later ones, without rewriting."""
        store = OriginalLimits(tmp_path)
        store.remember("GPU-a", 200.0)
        mtime = (tmp_path / STATE_FILE_NAME).stat().st_mtime_ns
        store.remember("GPU-a", 150.0)
        assert store.get("GPU-a") == 200.0
        assert (tmp_path / STATE_FILE_NAME).stat().st_mtime_ns == mtime

    def test_forget_unknown_writes_nothing(self, tmp_path: Path) -> None:
        """Forgetting a GPU with no entry does not create the file."""
        OriginalLimits(tmp_path).forget("GPU-x")
        assert not (tmp_path / STATE_FILE_NAME).exists()

    def test_creates_missing_state_dir(self, tmp_path: Path) -> None:
        """A state directory that does not exist yet is created on the first write."""
        state_dir = tmp_path / "a" / "b"
        OriginalLimits(state_dir).remember("GPU-a", 200.0)
        assert on_disk(state_dir) == {"GPU-a": 200.0}

    def test_memory_only_store(self) -> None:
        """A store without a directory keeps entries in memory and reports no error."""
        store = OriginalLimits(None)
        store.remember("GPU-a", 200.0)
        assert store.items() == [("GPU-a", 200.0)]
        assert (store.path, store.last_error, store.write_errors) == (None, None, 0)

    def test_items_sorted(self, tmp_path: Path) -> None:
        """items() lists entries sorted by UUID."""
        store = OriginalLimits(tmp_path)
        for uuid in ("GPU-c", "GPU-a", "GPU-b"):
            store.remember(uuid, 100.0)
        assert [u for u, _ in store.items()] == ["GPU-a", "GPU-b", "GPU-c"]


class TestLoad:
    """A missing, unreadable or corrupt file gives an empty store, with a warning when it is not just missing."""

    def test_missing_file_is_silent(self, tmp_path: Path) -> None:
        """No state file: empty and no warning."""
        store = OriginalLimits(tmp_path)
        assert (store.items(), store.load_warning) == ([], None)

    @pytest.mark.parametrize(
        "content",
        [
            b"{not json",
            b"[1, 2]",
            b'{"version": 1}',
            b'{"original_power_limits_w": [200]}',
            b'{"original_power_limits_w": {"GPU-a": "lots"}}',
            b'{"original_power_limits_w": {"GPU-a": -5}}',
            b'{"original_power_limits_w": {"GPU-a": 0}}',
            b'{"original_power_limits_w": {"GPU-a": NaN}}',
            b'{"original_power_limits_w": {"GPU-a": null}}',
            b"\xff\xfe\x00binary",
            b"",
        ],
    )
    def test_corrupt_file(self, tmp_path: Path, content: bytes) -> None:
        """A corrupt or non-UTF-8 file gives an empty store and a load_warning naming the file."""
        (tmp_path / STATE_FILE_NAME).write_bytes(content)
        store = OriginalLimits(tmp_path)
        assert store.items() == []
        assert store.load_warning is not None
        assert STATE_FILE_NAME in store.load_warning

    def test_unreadable_path(self, tmp_path: Path) -> None:
        """A state 'file' that is a directory gives an empty store and a load_warning."""
        (tmp_path / STATE_FILE_NAME).mkdir()
        store = OriginalLimits(tmp_path)
        assert store.items() == []
        assert store.load_warning is not None
        assert "not a regular file" in store.load_warning

    def test_one_bad_entry_keeps_the_others(self, tmp_path: Path) -> None:
        """One bad value sets the file aside and makes that GPU suspect; the valid entries are kept."""
        body = {"original_power_limits_w": {"GPU-a": 200.0, "GPU-b": -1.0}}
        (tmp_path / STATE_FILE_NAME).write_text(json.dumps(body), encoding="utf-8")
        store = OriginalLimits(tmp_path)
        assert store.items() == [("GPU-a", 200.0)]
        assert store.suspect("GPU-b") and not store.suspect("GPU-a")
        assert (tmp_path / (STATE_FILE_NAME + ".corrupt")).exists()


class TestWriteFailure:
    """A store that cannot write keeps working in memory and says so."""

    def blocked(self, tmp_path: Path) -> OriginalLimits:
        """A store whose state directory cannot be created: its parent path is a regular file."""
        (tmp_path / "blocker").write_text("not a directory", encoding="utf-8")
        return OriginalLimits(tmp_path / "blocker" / "state")

    def test_error_counted_and_values_kept(self, tmp_path: Path) -> None:
        """A failed write increments write_errors, sets last_error naming the path, and keeps the value."""
        store = self.blocked(tmp_path)
        store.remember("GPU-a", 200.0)
        assert store.write_errors == 1
        assert store.last_error is not None
        assert str(store.path) in store.last_error
        assert store.get("GPU-a") == 200.0

    def test_each_failed_write_counted(self, tmp_path: Path) -> None:
        """Every failed save counts, including forget."""
        store = self.blocked(tmp_path)
        store.remember("GPU-a", 200.0)
        store.remember("GPU-b", 300.0)
        store.forget("GPU-a")
        assert store.write_errors == 3
        assert store.items() == [("GPU-b", 300.0)]

    def test_error_clears_after_a_good_write(self, tmp_path: Path) -> None:
        """Once the directory becomes writable again, the next save clears last_error and writes everything."""
        store = self.blocked(tmp_path)
        store.remember("GPU-a", 200.0)
        (tmp_path / "blocker").unlink()
        store.remember("GPU-b", 300.0)
        assert store.last_error is None
        assert store.write_errors == 1
        assert on_disk(tmp_path / "blocker" / "state") == {"GPU-a": 200.0, "GPU-b": 300.0}

    def test_failed_write_leaves_old_file_and_no_temp(self, tmp_path: Path) -> None:
        """When the rename fails, the previous file stays intact and the temporary file is removed."""
        store = OriginalLimits(tmp_path)
        store.remember("GPU-a", 200.0)
        # Make the state file path unreplaceable: a non-empty directory cannot be replaced by a file.
        (tmp_path / STATE_FILE_NAME).unlink()
        (tmp_path / STATE_FILE_NAME).mkdir()
        (tmp_path / STATE_FILE_NAME / "keep").write_text("x", encoding="utf-8")
        store.remember("GPU-b", 300.0)
        assert store.write_errors == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE_NAME]
