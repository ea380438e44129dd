"""One JSON state file of the governor's: where it is, how it is read at start and saved after.

The three durable stores build on :class:`StateFile`: the original power limits
(:mod:`governor.state`), the fan takeovers (:mod:`governor.fanstate`) and the units the
governor stopped (:mod:`governor.unitstate`). It owns what they share:

* the path, ``<state_dir>/<name>``; without a state directory a store lives in memory
  only and nothing is read or written;
* the read at start (:meth:`StateFile._load`): bounded and typed
  (:func:`governor.safefile.read_json`), then checked entry by entry by the store's own
  parser. A file with any problem never stops the start: it is kept as ``<name>.corrupt``
  for a person to inspect (a copy when its bytes could be read, so the file itself is
  only ever replaced atomically; else the file itself is moved there), ``load_warning``
  names the file and says what was expected, and every valid entry is kept;
* the save (:meth:`StateFile._write`): atomic and durable through
  :func:`governor.safefile.write_state`. A failure is counted in ``write_errors`` and
  described in ``last_error`` (the file and why); the next successful save clears it;
* ``warnings``: entries given up after the start, for the daemon to log once each
  (:meth:`StateFile.drain_warnings`);
* the check on every tick (:meth:`StateFile.keep`): a saved file deleted, replaced or
  changed under the governor (the state directory removed, a forged file) is written
  again from what the governor saved, so a crash after it loses nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from governor.safefile import CORRUPT_SUFFIX, UnusableFile, read_json, set_aside, state_json, write_state

GPU_UUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""What a GPU UUID saved as a key must look like (NVML's are ``GPU-`` and hex, MIG's ``MIG-``)."""
MAX_REPORTED_PROBLEMS = 5
"""A load warning names this many problems of a bad file, then counts the rest."""

EntriesT = TypeVar("EntriesT", bound=Sized)


@dataclass(frozen=True)
class Loaded(Generic[EntriesT]):
    """What a state file held at start: its valid entries, the bytes read, and whether any were rejected."""

    entries: EntriesT
    raw: bytes
    rejected: bool


class StateFile:
    """A store's JSON file ``name`` under ``state_dir`` (None: memory only).

    ``content`` names what the file holds in messages ("the original limits"); ``if_bad``
    says what the governor does about a bad file ("; every fan is handed back ...").
    """

    def __init__(self, state_dir: Path | str | None, name: str, content: str, if_bad: str = "") -> None:
        self.path: Path | None = None if state_dir is None else Path(state_dir) / name
        self.content = content
        self.if_bad = if_bad
        self.last_error: str | None = None  # why the last save failed; None once one succeeds
        self.write_errors = 0  # failed saves, ever
        self.load_warning: str | None = None  # what was wrong with the file at start
        self.set_aside_to: Path | None = None  # where a bad file was kept
        self.warnings: list[str] = []  # entries given up since the last drain, for the daemon to log
        self._written: str | None = None  # the text last saved
        self._identity: tuple[int, int, int, int] | None = None  # the saved file's device, inode, size, mtime (ns)
        corrupt = self.corrupt_path
        self._corrupt_seen = corrupt is not None and os.path.lexists(corrupt)  # a bad file was kept, now or before

    @property
    def corrupt_path(self) -> Path | None:
        """Where a bad file is kept (``<name>.corrupt``)."""
        return None if self.path is None else self.path.with_name(self.path.name + CORRUPT_SUFFIX)

    @property
    def corrupt_seen(self) -> bool:
        """True when a bad file was kept aside, by this run or an earlier one (``<name>.corrupt`` exists)."""
        return self._corrupt_seen

    def drain_warnings(self) -> list[str]:
        """Warnings about entries given up since the last call (for the daemon to log)."""
        out, self.warnings = self.warnings, []
        return out

    def keep(self) -> None:
        """Write the last saved document again when its file is gone or is not the one written (another
        device, inode, size or mtime): one warning, then retried every call while it fails (each failure
        counted as a failed save)."""
        if self.path is None or self._written is None or _identity(self.path) == self._identity:
            return
        if self.last_error is None:
            self.warnings.append(f"{self.path}: deleted or replaced under the governor; {self.content} saved again")
        self._write(self._written, encoded=True)

    def _load(self, parse: Callable[[Any], tuple[EntriesT, list[str]]]) -> Loaded[EntriesT] | None:
        """The file's valid entries as ``parse`` finds them (it returns them and every problem),
        or None when there is no file or it cannot be read as JSON at all. Any problem sets the
        file aside and ``load_warning``; never raises for what the file holds."""
        if self.path is None:
            return None
        try:
            data, raw = read_json(self.path)
        except FileNotFoundError:
            return None
        except UnusableFile as exc:
            self.load_warning = f"{exc}; {self.content} in it are ignored{self.if_bad} ({self._keep_aside(None)})"
            return None
        entries, problems = parse(data)
        if problems:
            shown = "; ".join(problems[:MAX_REPORTED_PROBLEMS])
            if len(problems) > MAX_REPORTED_PROBLEMS:
                shown += f"; and {len(problems) - MAX_REPORTED_PROBLEMS} more"
            kept = "the valid entries are kept" if len(entries) else f"{self.content} in it are ignored"
            self.load_warning = f"{self.path}: {shown}; {kept}{self.if_bad} ({self._keep_aside(raw)})"
        return Loaded(entries, raw, bool(problems))

    def _keep_aside(self, raw: bytes | None) -> str:
        """Keep the bad file as ``<name>.corrupt`` (a copy of ``raw``, else the file moved); where it went, in words."""
        assert self.path is not None
        self.set_aside_to = set_aside(self.path, raw)
        self._corrupt_seen = True
        return "could not be set aside" if self.set_aside_to is None else f"kept as {self.set_aside_to}"

    def _write(self, document: object, *, unless_written: bool = False, encoded: bool = False) -> bool:
        """Save ``document`` atomically and durably; True once it is on disk.

        False without a state directory, or when the save failed: then ``last_error`` says
        why and ``write_errors`` counts it (the store tries again with its next save). With
        ``unless_written``, a document the last successful save already wrote is not
        written again; ``encoded``: ``document`` is the JSON text already.
        """
        if self.path is None:
            return False
        body = str(document) if encoded else state_json(document)
        if unless_written and body == self._written:
            self.last_error = None  # the file holds it already (a failed save in between left it as it was)
            return True
        try:
            write_state(self.path, body)
        except OSError as exc:
            self.write_errors += 1
            self.last_error = f"{self.path}: cannot save {self.content}: {exc.strerror or exc}"
            return False
        self.last_error = None
        self._written, self._identity = body, _identity(self.path)
        return True


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """The file at ``path`` as (device, inode, size, mtime in ns), or None when there is none."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
