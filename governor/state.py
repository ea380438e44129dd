"""The persisted original power limits: what the governor found before it changed anything.

A JSON file under the state directory, ``original-limits.json``, saved and read as every
state file is (:class:`governor.statefile.StateFile`): replaced atomically and durably
each time an entry changes, so a crash at any moment leaves either the old or the new
file. Per GPU (by UUID) it records the original limit and the limit the governor last
set (version 2)::

    {"version": 2,
     "original_power_limits_w": {"GPU-...": 200.0},
     "last_set_power_limits_w": {"GPU-...": 180.0}}

Version 1 files (the same without ``last_set_power_limits_w``) are still read.

The actuator changes a GPU only once its original is on disk (:meth:`OriginalLimits.is_durable`);
a save that fails leaves it in memory and sets ``last_error``, and the actuator retries
the save on the next change it wants.

Every value read is checked: a real number of watts (not a bool, not a string), finite,
above 0; keys must look like GPU UUIDs. A file with any problem is kept as
``original-limits.json.corrupt`` and ``load_warning`` says why; the valid entries are
kept and written back at once. An entry whose original is unusable stays as a *marker*:
the governor changed that GPU once, so its present limit may be the governor's own (see
:meth:`OriginalLimits.suspect`); on disk a marker is a GPU listed in
``last_set_power_limits_w`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from governor.model import MAX_PLAUSIBLE_W, plausible_w
from governor.safefile import short_repr
from governor.statefile import GPU_UUID, StateFile

STATE_FILE_NAME = "original-limits.json"
VERSION = 2
ORIGINAL_KEY = "original_power_limits_w"
LAST_SET_KEY = "last_set_power_limits_w"


@dataclass
class Entry:
    """What is saved about one GPU: its original limit and the governor's last one, in watts."""

    original_w: float | None = None
    last_set_w: float | None = None


def _watts(value: object) -> float | None:
    """``value`` as watts if it is a limit a GPU can have (:func:`governor.model.plausible_w`), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and not 0 < value < MAX_PLAUSIBLE_W:  # compared as int: no OverflowError
        return None
    watts = float(value)
    return watts if plausible_w(watts) else None


def _parse(data: Any) -> tuple[dict[str, Entry], list[str]]:
    """The entries of a version 1 or 2 document and every problem found in it."""
    if not isinstance(data, dict):
        return {}, [f"expected a JSON object, got {type(data).__name__}"]
    version = data.get("version", 1)
    originals = data.get(ORIGINAL_KEY)
    last_set = data.get(LAST_SET_KEY, {}) if version == VERSION else {}
    if version not in (1, VERSION) or not isinstance(originals, dict) or not isinstance(last_set, dict):
        return {}, [
            f"expected version 1 or 2 with objects {ORIGINAL_KEY} (and {LAST_SET_KEY}), got "
            f"version {short_repr(version)} with {ORIGINAL_KEY} {short_repr(originals)}"
        ]
    entries: dict[str, Entry] = {}
    problems: list[str] = []
    for key, table in ((ORIGINAL_KEY, originals), (LAST_SET_KEY, last_set)):
        for uuid, value in table.items():
            if not GPU_UUID.fullmatch(uuid):
                problems.append(f"{key}: {short_repr(uuid)}: expected a GPU UUID as the key; entry dropped")
                continue
            entry = entries.setdefault(uuid, Entry())
            watts = _watts(value)
            if watts is None:
                problems.append(f"{key}: {uuid}: expected a number of watts, got {short_repr(value)}")
            elif key == ORIGINAL_KEY:
                entry.original_w = watts
            else:
                entry.last_set_w = watts
    return entries, problems


class OriginalLimits(StateFile):
    """GPU UUID -> original power limit (and last limit set) in watts, in memory and on disk."""

    def __init__(self, state_dir: Path | str | None) -> None:
        super().__init__(state_dir, STATE_FILE_NAME, "the original limits")
        self.version = 0  # one more on every change of the entries (each one saves): what caches key on
        self._entries: dict[str, Entry] = {}
        self._saved: dict[str, Entry] = {}  # what the file holds since the last successful save
        self._raw: bytes | None = None  # the bytes loaded, for a copy if an entry is rejected later
        loaded = self._load(_parse)
        if loaded is not None:
            self._entries, self._raw = loaded.entries, loaded.raw
            self.version += 1
            if loaded.rejected:
                self._save()  # the good entries and the markers, durable before anything changes
            else:
                self._saved = _copy(self._entries)

    # ------------------------------------------------------------------ queries

    def get(self, uuid: str) -> float | None:
        """The saved original limit of a GPU in watts, or None."""
        entry = self._entries.get(uuid)
        return None if entry is None else entry.original_w

    def last_set(self, uuid: str) -> float | None:
        """The limit the governor last set on a GPU (watts), as recorded, or None."""
        entry = self._entries.get(uuid)
        return None if entry is None else entry.last_set_w

    def items(self) -> list[tuple[str, float]]:
        """Every saved (uuid, original watts) pair."""
        return sorted((u, e.original_w) for u, e in self._entries.items() if e.original_w is not None)

    def recorded(self) -> list[str]:
        """Every GPU with an entry: an original to restore, or a marker (see :meth:`suspect`)."""
        return sorted(self._entries)

    def is_durable(self, uuid: str) -> bool:
        """True when the GPU's original is on disk (always, for a store without a directory)."""
        if self.path is None:
            return uuid in self._entries and self._entries[uuid].original_w is not None
        saved = self._saved.get(uuid)
        return saved is not None and saved.original_w is not None and saved.original_w == self.get(uuid)

    def suspect(self, uuid: str) -> bool:
        """True when this GPU has no usable original but may carry a limit the governor set.

        That is: its entry is a marker (the original was unusable), or a bad state file
        was set aside (``original-limits.json.corrupt`` exists, now or from an earlier run).
        """
        entry = self._entries.get(uuid)
        if entry is not None and entry.original_w is not None:
            return False
        return entry is not None or self._corrupt_seen

    # ------------------------------------------------------------------ changes

    def remember(self, uuid: str, limit_w: float, last_set_w: float | None = None) -> bool:
        """Record a GPU's original limit (the first value seen stays) and the limit about to be set.

        Saves when anything changed, or when the original is not on disk yet (a retry
        after a failed save). Returns True when the original is on disk afterwards.
        """
        entry = self._entries.setdefault(uuid, Entry())
        changed = False
        if entry.original_w is None:
            entry.original_w, changed = float(limit_w), True
        if last_set_w is not None and entry.last_set_w != last_set_w:
            entry.last_set_w, changed = float(last_set_w), True
        if changed or not self.is_durable(uuid):
            self._save()
        return self.is_durable(uuid)

    def reject(self, uuid: str, why: str) -> None:
        """The saved original of a GPU cannot be right (outside its range): keep the file aside, keep a marker."""
        entry = self._entries.get(uuid)
        if entry is None or entry.original_w is None:
            return
        message = f"{self.path}: {uuid}: {ORIGINAL_KEY}: {why}"
        if self.path is not None and self.set_aside_to is None and self._raw is not None:
            message += f" (file {self._keep_aside(self._raw)})"
        self.warnings.append(message)
        entry.original_w = None
        self._save()

    def forget(self, uuid: str) -> None:
        """Drop a GPU's entry after its original limit was restored."""
        if self._entries.pop(uuid, None) is not None:
            self._save()

    def _save(self) -> None:
        self.version += 1  # every change of the entries ends here, saved or not
        document = {
            "version": VERSION,
            ORIGINAL_KEY: {u: e.original_w for u, e in self._entries.items() if e.original_w is not None},
            LAST_SET_KEY: {u: e.last_set_w for u, e in self._entries.items() if e.last_set_w is not None},
        }
        if self._write(document):
            self._saved = _copy(self._entries)


def _copy(entries: dict[str, Entry]) -> dict[str, Entry]:
    return {u: Entry(e.original_w, e.last_set_w) for u, e in entries.items()}
