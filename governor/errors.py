"""Every error gpu-governor raises on purpose, in one hierarchy, and the exit codes.

Each user-facing error carries its exit code (``exit_code``), so the command line maps
an error to its code in one place (:func:`governor.cli.main`) and a new error needs no
new ``except`` clause there::

    GovernorError                   1  base; an error that escapes unclassified is a bug
    ├── CliError                    the code given (usage 2, bind 6, unreachable 7 ...)
    ├── ConfigError                 3  invalid or untrusted configuration (``issues``)
    │   └── SimDataError            3  a simulated profile or scenario
    ├── StateError                  a state file that exists but cannot be used
    │   └── StateDirBusy           10  another gpu-governor process holds the state directory
    ├── StatusError                 ``status``: usage 2, unreachable 7, bad answer 9
    ├── ReloadRefused               3  ``reload``: the daemon refused the new config
    ├── TraceError                  2  a malformed trace file
    ├── WhatIfError                 the code given (2 unless told)
    └── BackendError                5  base of every hardware backend error
        ├── BackendUnavailable      4  no NVIDIA driver / library / GPU (try --simulate)
        ├── BackendFatal            5  only a restart can fix it (driver upgraded)
        └── GpuError                   one GPU or one action failed; governing goes on
            ├── GpuLostError           the GPU stopped answering
            ├── SetLimitRefused        no permission / not supported: monitor-only
            └── SetLimitFailed         may pass on a later try

The split that matters: code that carries on after a hardware failure catches
:class:`GpuError` and nothing wider. :class:`BackendFatal` is *not* a GpuError, so no
``except GpuError`` swallows it: the actuator lets it through (while setting, while
restoring), the daemon restores what it can and exits 5.

The exit codes below are the table in :mod:`governor.cli`'s docstring and the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final

EXIT_OK: Final = 0
EXIT_INTERNAL: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONFIG: Final = 3
EXIT_NO_DRIVER: Final = 4
EXIT_BACKEND_FATAL: Final = 5
EXIT_BIND: Final = 6
EXIT_UNREACHABLE: Final = 7
EXIT_GPU_UNHEALTHY: Final = 8
EXIT_BAD_ANSWER: Final = 9
EXIT_BUSY: Final = 10
EXIT_NOT_RESTORED: Final = 11
EXIT_NO_RELOAD: Final = 12
EXIT_INTERRUPTED: Final = 130
EXIT_BROKEN_PIPE: Final = 141

MAX_SHOWN_ISSUES: Final = 20
"""A config error prints at most this many problems, then one line counting the rest."""

__all__ = [
    "EXIT_BACKEND_FATAL",
    "EXIT_BAD_ANSWER",
    "EXIT_BIND",
    "EXIT_BROKEN_PIPE",
    "EXIT_BUSY",
    "EXIT_CONFIG",
    "EXIT_GPU_UNHEALTHY",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_RESTORED",
    "EXIT_NO_DRIVER",
    "EXIT_NO_RELOAD",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "MAX_SHOWN_ISSUES",
    "BackendError",
    "BackendFatal",
    "BackendUnavailable",
    "CliError",
    "ConfigError",
    "ConfigIssue",
    "GovernorError",
    "GpuError",
    "GpuLostError",
    "ListenUnavailable",
    "ReloadRefused",
    "SetLimitFailed",
    "SetLimitRefused",
    "SimDataError",
    "StateDirBusy",
    "StateError",
    "StatusError",
    "TraceError",
    "UnusableFile",
    "WhatIfError",
]


class GovernorError(Exception):
    """Base of every error gpu-governor raises on purpose; ``exit_code`` ends the command."""

    exit_code: int = EXIT_INTERNAL

    def lines(self) -> list[str]:
        """What the command line prints, one line each, after ``gpu-governor: ``."""
        return [str(self)]


class CliError(GovernorError):
    """A command-line error with its exit code; printed as one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code

    @property
    def code(self) -> int:
        """The exit code (the older name of ``exit_code``)."""
        return self.exit_code


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem found in a config file."""

    file: str
    key: str
    expected: str
    got: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: expected {self.expected}, got {self.got}"


class ListenUnavailable(CliError):
    """The metrics address is in use (another process holds the port) or not on this host yet
    (an address a network service adds later): the daemon governs without its endpoint and
    tries to bind again (governor.listener). Exit code 6 where a command cannot wait."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_BIND)


class ConfigError(GovernorError):
    """A config file could not be used; ``issues`` lists every problem found."""

    exit_code = EXIT_CONFIG

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(self.summary()))

    def summary(self, limit: int = MAX_SHOWN_ISSUES) -> list[str]:
        """The first ``limit`` problems as lines, then one line counting the rest (a hostile
        file with 50k unknown keys must not print megabytes)."""
        lines = [str(i) for i in self.issues[:limit]]
        rest = len(self.issues) - limit
        if rest > 0:
            lines.append(f"{self.issues[0].file}: ... and {rest} more problem(s) not shown")
        return lines

    def lines(self) -> list[str]:
        """One ``config error:`` line per problem shown."""
        return [f"config error: {line}" for line in self.summary()]


class SimDataError(ConfigError):
    """A profile or scenario could not be used; ``issues`` names file, key, expected, got."""


class StateError(GovernorError):
    """A state file that exists but cannot be used; the message names the file and why.

    The daemon never stops on one: it sets the file aside and carries on (see
    :mod:`governor.state`); the exit code only matters to a command that cannot.
    """

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


UnusableFile = StateError
"""The older name of :class:`StateError` (:mod:`governor.safefile`)."""


class StateDirBusy(StateError):
    """Another gpu-governor process (a running daemon, or a restore) holds the state directory's
    lock (:mod:`governor.statelock`); ``holder_pid`` is the PID it wrote there, None when unknown."""

    exit_code = EXIT_BUSY

    def __init__(self, path: Path, holder_pid: int | None, why: str) -> None:
        super().__init__(path, why)
        self.holder_pid = holder_pid


class StatusError(GovernorError):
    """Why ``status`` has nothing to show; ``kind`` is ``usage`` (a bad ``--url``),
    ``unreachable`` (no answer: refused, timeout, name, TLS) or ``answer`` (an answer that
    is not usable gpu-governor metrics: 401, 404, another HTTP error, other content)."""

    CODES: ClassVar[dict[str, int]] = {"usage": EXIT_USAGE, "unreachable": EXIT_UNREACHABLE, "answer": EXIT_BAD_ANSWER}

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = self.CODES.get(kind, EXIT_INTERNAL)


class ReloadRefused(GovernorError):
    """``reload``: the daemon ``pid`` refused the new config and kept the running one; ``errors``
    are its lines (file, key, what was expected), as it logged them."""

    exit_code = EXIT_CONFIG

    def __init__(self, pid: int, errors: Sequence[str]) -> None:
        self.pid = pid
        self.errors = tuple(errors)
        super().__init__(f"process {pid} refused the new configuration: " + "; ".join(self.errors))

    def lines(self) -> list[str]:
        """A line saying the running configuration stays, then one ``config error:`` line per problem."""
        head = f"reload: process {self.pid} refused the new configuration and keeps running the old one"
        return [head, *(f"config error: {line}" for line in self.errors)]


class TraceError(GovernorError):
    """A trace file is malformed; the message names the file, line and field."""

    exit_code = EXIT_USAGE


class WhatIfError(GovernorError):
    """A what-if command cannot go on; printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = code

    @property
    def code(self) -> int:
        """The exit code (the older name of ``exit_code``)."""
        return self.exit_code


# --------------------------------------------------------------------------- backends


class BackendError(GovernorError):
    """Base of every error a hardware backend raises."""

    exit_code = EXIT_BACKEND_FATAL


class BackendUnavailable(BackendError):
    """The backend cannot start at all (no NVIDIA driver, no library, no GPU)."""

    exit_code = EXIT_NO_DRIVER


class BackendFatal(BackendError):
    """The backend broke in a way only a restart can fix (driver upgraded under us).

    Never caught by code that carries on: it ends the daemon (exit 5) after the
    original limits were restored where the hardware still allowed it.
    """

    exit_code = EXIT_BACKEND_FATAL


class GpuError(BackendError):
    """One GPU, or one action on it, failed; the others and the governor carry on.

    The only backend error the actuator catches.
    """


class GpuLostError(GpuError):
    """The GPU stopped answering."""


class SetLimitRefused(GpuError):
    """Setting a power limit is not permitted or not supported on this GPU.

    The governor marks the GPU monitor-only rather than retrying every tick.
    """


class SetLimitFailed(GpuError):
    """Setting a power limit failed in a way that may pass on a later try."""
