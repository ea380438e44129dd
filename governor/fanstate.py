"""The persisted fan takeovers: which GPUs' fans the governor took from the card's control.

The fans' "original" is always the card's automatic control, so what must survive a crash
is only *which* GPUs the governor drives (and how many fans they have). The same
durability rules as the original power limits (:mod:`governor.state`): a JSON file under
the state directory, ``fan-control.json``, saved and read as every state file is
(:class:`governor.statefile.StateFile`: replaced atomically and durably before the first
fan of a GPU is set, read bounded and checked at start)::

    {"version": 1, "manual_fans": {"GPU-...": 2}}

The actuator sets a fan only once its GPU is on disk (:meth:`FanControl.remember` returned
True); at start and on stop every listed GPU gets every fan handed back to automatic
control, and the entry is dropped once that worked; fans an entry lists beyond those the
GPU has (its fan count, once known) are dropped with a warning (:meth:`FanControl.cap`),
never tried again. A file with any problem is kept as
``fan-control.json.corrupt`` and the store turns *suspect*: the governor may have left
any fan in manual control, so every fan of every GPU is handed back at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from governor.safefile import short_repr
from governor.statefile import GPU_UUID, StateFile

FAN_STATE_FILE_NAME = "fan-control.json"
VERSION = 1
KEY = "manual_fans"
MAX_FANS = 32


class FanControl(StateFile):
    """GPU UUID -> number of fans the governor may have set by hand, in memory and on disk
    (memory only when ``state_dir`` is None)."""

    def __init__(self, state_dir: Path | str | None) -> None:
        handed_back = "; every fan is handed back to the card's control at start"
        super().__init__(state_dir, FAN_STATE_FILE_NAME, "the fan takeovers", handed_back)
        self._entries: dict[str, int] = {}
        self._saved: dict[str, int] = {}
        loaded = self._load(_parse)
        if loaded is not None:
            self._entries = loaded.entries
            if loaded.rejected:
                self._save()
            else:
                self._saved = dict(self._entries)
        self.suspect = self._corrupt_seen  # a bad file was set aside (now or before): any fan may be ours

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

    def cap(self, uuid: str, fan_count: int) -> None:
        """The GPU has only ``fan_count`` fans: an entry for more is cut to that (dropped at 0),
        with a warning, so that fans that do not exist are not tried at every start."""
        saved = self._entries.get(uuid)
        if saved is None or saved <= fan_count:
            return
        missing = f"fan {fan_count}" if saved == fan_count + 1 else f"fans {fan_count}-{saved - 1}"
        self.warnings.append(
            f"{self.path or FAN_STATE_FILE_NAME}: {uuid}: {KEY}: {saved} fans saved, but the GPU has {fan_count}: "
            f"{missing} cannot be handed back and {'is' if saved == fan_count + 1 else 'are'} dropped"
        )
        if fan_count > 0:
            self._entries[uuid] = fan_count
        else:
            del self._entries[uuid]
        self._save()

    def forget(self, uuid: str) -> None:
        """Drop a GPU whose fans are all back under the card's control."""
        if self._entries.pop(uuid, None) is not None:
            self._save()

    def _save(self) -> None:
        if self._write({"version": VERSION, KEY: self._entries}):
            self._saved = dict(self._entries)


def _parse(data: Any) -> tuple[dict[str, int], list[str]]:
    """The entries of a version 1 document and every problem found in it."""
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get(KEY), dict):
        return {}, [f"expected version {VERSION} with an object {KEY}, got {short_repr(data)}"]
    entries: dict[str, int] = {}
    problems = []
    for uuid, count in data[KEY].items():
        if not GPU_UUID.fullmatch(uuid):
            problems.append(f"{short_repr(uuid)}: expected a GPU UUID")
        elif isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_FANS:
            problems.append(f"{uuid}: expected a fan count 1-{MAX_FANS}, got {short_repr(count)}")
        else:
            entries[uuid] = count
    return entries, problems
