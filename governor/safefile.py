"""Reading and writing the governor's own state files, safely as root.

Every state file the governor reads (the saved original limits, the simulator's
hardware state) goes through :func:`read_bounded` or :func:`read_json`: opened with
O_NOFOLLOW | O_NONBLOCK, checked with fstat to be a regular file, read up to a size
cap. A symlink, FIFO, device or directory is refused at once (a FIFO never blocks the
start, a link to /dev/zero is never read), and every parse error (RecursionError from
deep nesting, ValueError from a 5000-digit integer, bad UTF-8) becomes one
:class:`UnusableFile` naming the file and what is wrong.

Every state file the governor writes goes through :func:`write_atomic`: a temporary
file created exclusively in the target directory (``tempfile.mkstemp``: O_EXCL, mode
0600, an unpredictable name, so a planted symlink is never followed), written, fsynced,
renamed over the target, then the directory fsynced: a crash leaves the old file or
the new one, never a torn one, and a completed call survives a power cut.

:func:`check_private_dir` is the ownership and mode check for the directories these
files live in when the governor runs as root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from governor.errors import UnusableFile as UnusableFile  # noqa: PLC0414  (re-exported)

MAX_STATE_BYTES = 1024 * 1024
"""Size cap (bytes) of one state file: the real ones are a few hundred bytes."""

CORRUPT_SUFFIX = ".corrupt"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_bounded(
    path: Path, max_bytes: int = MAX_STATE_BYTES, trust: Callable[[os.stat_result], list[str]] | None = None
) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` bytes.

    Raises FileNotFoundError when nothing is there (also when a parent is not a
    directory), UnusableFile for a symlink, FIFO, device, directory, a larger file, a
    read error, or a file the ``trust`` check (of the opened file's stat) has problems with.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except NotADirectoryError:  # a parent is not a directory: nothing can be there
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnusableFile(path, "a symbolic link, not a regular file (refused)") from None
        raise UnusableFile(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnusableFile(path, f"{_kind(info.st_mode)}, not a regular file (refused)")
        untrusted = [] if trust is None else trust(info)
        if untrusted:
            raise UnusableFile(path, " and ".join(untrusted) + " (refused unread)")
        if info.st_size > max_bytes:
            raise UnusableFile(path, f"{info.st_size} bytes, more than the {max_bytes} allowed (refused unread)")
        chunks = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise UnusableFile(path, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise UnusableFile(path, f"more than the {max_bytes} bytes allowed (refused)")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(path: Path, data: bytes) -> Any:
    """``data`` parsed as UTF-8 JSON (NaN and Infinity refused); UnusableFile on any parse error."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise UnusableFile(path, "not JSON the governor can use: nested too deeply") from None
    except (ValueError, OverflowError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise UnusableFile(path, f"not JSON the governor can use: {_short(str(exc))}") from None


def read_json(
    path: Path, max_bytes: int = MAX_STATE_BYTES, trust: Callable[[os.stat_result], list[str]] | None = None
) -> tuple[Any, bytes]:
    """The parsed JSON of a bounded regular file (see :func:`read_bounded`), and its raw bytes.

    Raises FileNotFoundError when nothing is there, UnusableFile for anything else wrong.
    """
    data = read_bounded(path, max_bytes, trust)
    return parse_json(path, data), data


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about bad values."""
    try:
        text = repr(value)
    except ValueError:  # an int too large to print
        text = f"<{type(value).__name__} too large to print>"
    return _short(text, limit)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (raises OSError when it fails)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: exclusive temporary file, (fsync), rename, (fsync directory).

    ``mode`` is the new file's permission bits. With ``durable`` (the default) the file
    and its directory are fsynced, so the new content survives a power cut once this
    returns; without it (a file on tmpfs that dies with the boot anyway) neither is.
    Raises OSError when any step fails; the temporary file is then removed and the old
    ``path`` is left as it was (unless only the final directory fsync failed).
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if mode != 0o600:
                os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


def open_output(path: Path | str, *, mode: int = 0o644) -> int:
    """A descriptor of ``path`` open for writing from its start, for output written as it comes (a
    recorded trace), created with ``mode`` if absent. Never through a planted link: O_NOFOLLOW
    refuses a symlink, and an existing file must be a regular file of this user with one link
    (a hard link to another user's file in a shared directory would otherwise be truncated)
    before it is truncated. OSError (a readable ``strerror``) otherwise."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link, which is not followed") from None
        if exc.errno == errno.ENXIO:
            raise OSError(errno.ENXIO, "it is a FIFO, not a regular file: not written") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{_kind(info.st_mode)}, not a regular file: not written")
        if info.st_uid != os.geteuid() or info.st_nlink != 1:
            raise OSError(errno.EPERM, "an existing file of another user, or with other links, is not overwritten")
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def state_json(document: object) -> str:
    """A state file's text: ``document`` as indented, key-sorted JSON with a final newline."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def write_state(path: Path, body: str) -> None:
    """Durably replace the state file ``path`` with ``body``, creating its directory (0700)
    when missing; raises OSError as :func:`write_atomic` does."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, body.encode("utf-8"))


def set_aside(path: Path, raw: bytes | None = None) -> Path | None:
    """Keep a bad state file as ``<name>.corrupt`` for a person to inspect; its new path, or None.

    With ``raw`` (the bytes read from it) a copy is written and ``path`` stays for the
    caller to replace atomically (so the good entries in it are never only in the copy);
    without, ``path`` itself (a FIFO, a symlink, an unreadable file) is renamed. Returns
    None when neither works (the caller reports the file as bad all the same).
    """
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    try:
        if raw is not None:
            write_atomic(target, raw)
        else:
            os.replace(path, target)
            fsync_dir(path.parent)
    except OSError:
        return None
    return target


def check_private_dir(path: Path, euid: int | None = None) -> str | None:
    """When running as root: None if ``path`` is missing or a root-owned directory no one else may write
    below parents no one else may write either, else what is wrong with it (a sentence naming the directory)."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return None
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None  # nothing there (yet): writing to it fails later and is reported then
    except OSError as exc:
        return f"{path}: cannot be checked ({exc.strerror or exc})"
    problems = [] if stat.S_ISDIR(info.st_mode) else ["not a directory"]
    problems += root_trust_problems(info)
    if problems:
        return f"{path} " + " and ".join(problems)
    return untrusted_ancestor(path)


def untrusted_ancestor(path: Path) -> str | None:
    """What is wrong with the first directory above ``path`` (as written and as resolved) that
    another user could use to swap ``path`` for a directory of theirs: not owned by root, or
    writable by group or others without the sticky bit (/tmp's bit: no one else may rename a
    root-owned entry in it); None when every one is trusted."""
    absolute = Path(os.path.abspath(path))
    seen: set[Path] = set()
    for start in (absolute, absolute.resolve()):
        for parent in start.parents:
            if parent in seen:
                continue
            seen.add(parent)
            try:
                info = os.stat(parent)
            except OSError as exc:
                return f"{path}: its parent {parent} cannot be checked ({exc.strerror or exc})"
            problems = root_trust_problems(info)
            if info.st_uid == 0 and info.st_mode & stat.S_ISVTX:
                problems = []  # sticky and root's (/tmp): entries are renamed only by their owners
            if problems:
                return (
                    f"{path}: its parent {parent} is "
                    + " and ".join(problems)
                    + ", so its owner could put something else in its place"
                )
    return None


def root_trust_problems(info: os.stat_result) -> list[str]:
    """Why a file or directory (its ``stat``) is not trusted by a daemon running as root: not
    owned by root, or writable by group or others; empty when it is trusted."""
    problems = []
    if info.st_uid != 0:
        problems.append(f"owned by uid {info.st_uid}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"writable by group or others (mode {stat.S_IMODE(info.st_mode):o})")
    return problems
