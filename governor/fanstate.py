"""The persisted fan takeovers: which GPUs' fans the governor took from the card's control.

The fans' "original" is always the card's automatic control, so what must survive a crash
is only *which* GPUs the governor drives (and how many fans they have). The same
durability rules as the original power limits (:mod:`governor.state`): a JSON file under
the state directory, ``fan-control.json``, written through
:func:`governor.safefile.write_atomic` (exclusive temporary file, fsync, rename, fsync of
the directory) before the first fan of a GPU is set, read bounded and typed at start::

    {"version": 1, "manual_fans": {"GPU-...": 2}}

The actuator sets a fan only once its GPU is on disk (:meth:`FanControl.remember` returned
True); at start and on stop every listed GPU gets every fan handed back to automatic
control, and the entry is dropped once that worked. A file with any problem is kept as
``fan-control.json.corrupt`` and the store turns *suspect*: the governor may have left
any fan in manual control, so every fan of every GPU is handed back at start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from governor.safefile import CORRUPT_SUFFIX, UnusableFile, read_json, set_aside, short_repr, state_json, write_state

FAN_STATE_FILE_NAME = "fan-control.json"
VERSION = 1
KEY = "manual_fans"
MAX_FANS = 32
_UUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class FanControl:
    """GPU UUID -> number of fans the governor may have set by hand, in memory and on disk
    (memory only when ``state_dir`` is None)."""

    def __init__(self, state_dir: Path | str | None) -> None:
        self.path = None if state_dir is None else Path(state_dir) / FAN_STATE_FILE_NAME
        self._entries: dict[str, int] = {}
        self._saved: dict[str, int] = {}
        self.last_error: str | None = None
        self.write_errors = 0
        self.load_warning: str | None = None
        self.suspect = False  # a bad file was set aside: any fan may be ours
        if self.path is not None:
            self.suspect = os.path.lexists(self.path.with_name(FAN_STATE_FILE_NAME + CORRUPT_SUFFIX))
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            data, raw = read_json(self.path)
        except FileNotFoundError:
            return
        except UnusableFile as exc:
            self._bad(f"{exc}", None)
            return
        entries, problem = _parse(data)
        self._entries = entries
        if problem is not None:
            self._bad(f"{self.path}: {problem}", raw)
            self._save()
        else:
            self._saved = dict(entries)

    def _bad(self, why: str, raw: bytes | None) -> None:
        assert self.path is not None
        moved = set_aside(self.path, raw)
        self.suspect = True
        where = f"kept as {moved}" if moved else "could not be set aside"
        self.load_warning = f"{why}; every fan is handed back to the card's control at start ({where})"

    def items(self) -> list[tuple[str, int]]:
        """Every (GPU UUID, fan count) whose fans the governor may have set."""
        return sorted(self._entries.items())

    def is_durable(self, uuid: str) -> bool:
        """True when the GPU's takeover is on disk (always, for a store without a directory)."""
        if self.path is None:
            return uuid in self._entries
        return uuid in self._saved and self._saved[uuid] == self._entries.get(uuid)

    def remember(self, uuid: str, fan_count: int) -> bool:
        """Record that the governor is about to set a fan of this GPU; True once that is on disk."""
        if self._entries.get(uuid) != fan_count:
            self._entries[uuid] = fan_count
            self._save()
        elif not self.is_durable(uuid):
            self._save()
        return self.is_durable(uuid)

    def forget(self, uuid: str) -> None:
        """Drop a GPU whose fans are all back under the card's control."""
        if self._entries.pop(uuid, None) is not None:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        body = state_json({"version": VERSION, KEY: self._entries})
        try:
            write_state(self.path, body)
        except OSError as exc:
            self.write_errors += 1
            self.last_error = f"{self.path}: cannot save the fan takeovers: {exc.strerror or exc}"
            return
        self.last_error = None
        self._saved = dict(self._entries)


def _parse(data: Any) -> tuple[dict[str, int], str | None]:
    """The entries of a version 1 document and the first problem found (None when none)."""
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get(KEY), dict):
        return {}, f"expected version {VERSION} with an object {KEY}, got {short_repr(data)}"
    entries: dict[str, int] = {}
    problems = []
    for uuid, count in data[KEY].items():
        if not _UUID.fullmatch(uuid):
            problems.append(f"{short_repr(uuid)}: expected a GPU UUID")
        elif isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_FANS:
            problems.append(f"{uuid}: expected a fan count 1-{MAX_FANS}, got {short_repr(count)}")
        else:
            entries[uuid] = count
    return entries, "; ".join(problems[:5]) or None
