"""The persisted original power limits: what the governor found before it changed anything.

A JSON file under the state directory, written atomically (temporary file, fsync,
rename) each time an entry is added or removed, so a crash at any moment leaves
either the old or the new file. On the next start the daemon restores every limit
still listed. A store that cannot be written keeps working in memory and says so
(``last_error``), so governing never stops for a full disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

STATE_FILE_NAME = "original-limits.json"


class OriginalLimits:
    """GPU UUID -> original power limit in watts, kept in memory and on disk."""

    def __init__(self, state_dir: Path | str | None) -> None:
        self.path = None if state_dir is None else Path(state_dir) / STATE_FILE_NAME
        self._limits: dict[str, float] = {}
        self.last_error: str | None = None
        self.write_errors = 0
        self.load_warning: str | None = None
        if self.path is not None:
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            self.load_warning = f"{self.path}: cannot read saved original limits: {exc.strerror or exc}"
            return
        except UnicodeDecodeError as exc:
            self.load_warning = f"{self.path}: saved original limits unreadable ({exc}); ignoring them"
            return
        try:
            data = json.loads(raw)
            limits = data["original_power_limits_w"]
            parsed = {str(k): float(v) for k, v in limits.items()}
            if not all(math.isfinite(v) and v > 0 for v in parsed.values()):
                raise ValueError("non-positive limit")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.load_warning = f"{self.path}: saved original limits unreadable ({exc}); ignoring them"
            return
        self._limits = parsed

    def get(self, uuid: str) -> float | None:
        """The saved original limit of a GPU in watts, or None."""
        return self._limits.get(uuid)

    def items(self) -> list[tuple[str, float]]:
        """Every saved (uuid, watts) pair."""
        return sorted(self._limits.items())

    def remember(self, uuid: str, limit_w: float) -> None:
        """Record a GPU's original limit, once: the first value seen is the original."""
        if uuid in self._limits:
            return
        self._limits[uuid] = limit_w
        self._save()

    def forget(self, uuid: str) -> None:
        """Drop a GPU's entry after its original limit was restored."""
        if self._limits.pop(uuid, None) is not None:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        body = json.dumps({"version": 1, "original_power_limits_w": self._limits}, indent=2, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".original-limits.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(body + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            self.write_errors += 1
            self.last_error = f"{self.path}: cannot save original limits: {exc.strerror or exc}"
            return
        self.last_error = None
