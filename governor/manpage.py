"""Man pages and bash completion, generated from the argument parser.

The parser (:func:`governor.cli.build_parser`) is the one source: every subcommand gets a
page ``gpu-governor-COMMAND(1)`` with its options, and ``gpu-governor(1)`` lists the
commands and every exit code; the bash completion knows the same commands and options.
The generated files are committed under ``share/`` (the layout of an install prefix) so
that a wheel carries them without running code at build time::

    python -m governor.manpage            # rewrite share/man/man1/*.1 and the completion
    python -m governor.manpage --check    # exit 1 naming every file that is out of date

tests/test_manpage.py fails when a file is out of date, so a new option or subcommand
cannot ship without its documentation.

Exit codes come from :mod:`governor.errors`; which command can end with which code is
:data:`COMMAND_EXIT_CODES` (checked by the tests against the constants).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from governor import __version__
from governor.cliinfo import PROG, Command, Option, commands
from governor.errors import (
    EXIT_BACKEND_FATAL,
    EXIT_BAD_ANSWER,
    EXIT_BIND,
    EXIT_BROKEN_PIPE,
    EXIT_BUSY,
    EXIT_CONFIG,
    EXIT_GPU_UNHEALTHY,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NO_DRIVER,
    EXIT_NO_RELOAD,
    EXIT_NOT_RESTORED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

MAN_DIR: Final = Path("share/man/man1")
COMPLETION_FILE: Final = Path("share/bash-completion/completions/gpu-governor")

EXIT_MEANINGS: Final[dict[int, str]] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "unexpected internal error (a bug: please report it)",
    EXIT_USAGE: "bad command-line usage, or a file named on the command line cannot be used",
    EXIT_CONFIG: "invalid or untrusted configuration (each problem is printed with file, key and what was expected)",
    EXIT_NO_DRIVER: "no NVIDIA driver or NVML library (try --simulate)",
    EXIT_BACKEND_FATAL: "the hardware backend failed fatally (e.g. the driver was upgraded): restart",
    EXIT_BIND: "the metrics address can never be bound (no permission, bad address); a port in use is retried",
    EXIT_UNREACHABLE: "no answer from the metrics endpoint (refused, timeout, unknown host, TLS failure)",
    EXIT_GPU_UNHEALTHY: "the daemon answered, and a GPU is lost or degraded",
    EXIT_BAD_ANSWER: "an answer that is not usable gpu-governor metrics (HTTP 401/403, 404, another error)",
    EXIT_BUSY: "another gpu-governor process holds the state directory (restore: a daemon runs and restores on "
    "its own stop; nothing was done)",
    EXIT_NOT_RESTORED: "restore: something recorded could not be put back (a GPU absent, a write failed, the state "
    "directory unusable); it stays recorded for the next start or restore",
    EXIT_NO_RELOAD: "reload: no acknowledgement from the daemon (no such process, not permitted to signal it, "
    "it exited, or none within --timeout)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C, SIGINT)",
    EXIT_BROKEN_PIPE: "standard output was closed early (e.g. piped into head); the rest is dropped quietly",
}
"""Every exit code of the command line and what it means (governor.errors, governor.cli)."""

_COMMON: Final = (EXIT_OK, EXIT_INTERNAL, EXIT_USAGE)
COMMAND_EXIT_CODES: Final[dict[str, tuple[int, ...]]] = {
    "run": (*_COMMON, EXIT_CONFIG, EXIT_NO_DRIVER, EXIT_BACKEND_FATAL, EXIT_BIND, EXIT_BUSY, EXIT_INTERRUPTED),
    "restore": (
        *_COMMON,
        EXIT_CONFIG,
        EXIT_NO_DRIVER,
        EXIT_BACKEND_FATAL,
        EXIT_BUSY,
        EXIT_NOT_RESTORED,
        EXIT_INTERRUPTED,
    ),
    "check-config": (*_COMMON, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE),
    "status": (
        *_COMMON,
        EXIT_CONFIG,
        EXIT_UNREACHABLE,
        EXIT_GPU_UNHEALTHY,
        EXIT_BAD_ANSWER,
        EXIT_INTERRUPTED,
        EXIT_BROKEN_PIPE,
    ),
    "reload": (*_COMMON, EXIT_CONFIG, EXIT_NO_RELOAD, EXIT_INTERRUPTED),
    "record": (*_COMMON, EXIT_CONFIG, EXIT_NO_DRIVER, EXIT_BACKEND_FATAL, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE),
    "calibrate": (*_COMMON, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE),
    "replay": (*_COMMON, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE),
    "simulate": (*_COMMON, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE),
    "hash-password": (*_COMMON, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE),
}
"""The exit codes each subcommand can end with; a subcommand not listed gets every code."""

EXTRA_DESCRIPTION: Final[dict[str, str]] = {
    "": "It normally runs as the systemd service gpu-governor.service (see gpu-governor-run(1)). "
    "Each command has its own page: man gpu-governor-COMMAND.",
    "run": "Runs in the foreground until SIGTERM or SIGINT, then restores the original power limits "
    "and exits 0. SIGHUP re-reads the configuration; an invalid file is refused and the running "
    "configuration stays. Under systemd it reports readiness and pings the watchdog (Type=notify). "
    "Options given on the command line win over the configuration file, on every reload too.",
    "restore": "Does what the next start of the daemon would do first, and only that: every power limit and "
    "fan recorded in the state directory (/var/lib/gpu-governor) as changed by a daemon that did not stop "
    "cleanly (a crash, a kill, a watchdog timeout, systemd giving up restarting it) is put back through the "
    "configured backend, logged, and its entry cleared; an entry that cannot be put back stays recorded. "
    "It refuses while a daemon holds the state directory (exit 10): that daemon restores on its own stop. "
    "With nothing recorded it opens no driver and exits 0. A bad state file is kept aside as .corrupt, never "
    "fatal. Units a stop-unit class stopped are never started: it names them (units_left_stopped) and leaves "
    "their list for the next start of the daemon, which resumes them once there is room, as after a clean stop. "
    "The unit runs it as ExecStopPost=, after every stop, and the Debian package's removal runs it when the "
    "service is not running. With dry_run (the configuration's or --dry-run) it only says what it would put back.",
    "check-config": "Prints the effective configuration as TOML on standard output, then the power ladder "
    "each GPU gets; problems go to standard error, one line each, naming the file, the key and what "
    "was expected.",
    "status": "Reads the daemon's metrics endpoint, never NVML: it needs no privileges and works "
    "against a remote host.",
    "reload": "systemctl reload gpu-governor runs it (the unit's ExecReload=); by hand: "
    "gpu-governor reload --pid $(systemctl show -p MainPID --value gpu-governor). It prints nothing when the new "
    "configuration is applied; a refused one prints the daemon's errors, one line each, naming the file, the key "
    "and what was expected. A reload that began before the signal (another SIGHUP's) is not taken for this one.",
    "hash-password": "Reads one password from standard input (prompted without echo on a terminal) "
    "and prints its hash on standard output; the password itself is never printed.",
}
"""Prose added after a command's help line (key: the command; "" for gpu-governor(1))."""

FILES: Final = (
    (
        "/etc/gpu-governor/governor.toml",
        "The configuration. A daemon running as root refuses a file not owned by root or writable by group or others.",
    ),
    (
        "/var/lib/gpu-governor",
        "The original power limits and the fans taken from the cards, saved so that they can be restored after "
        "a crash (by the next start, or by gpu-governor restore), and the units a stop-unit class stopped "
        "(stopped-units.json); governor.lock is held by the running daemon.",
    ),
)
ENVIRONMENT: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "status": (
        (
            "GPU_GOVERNOR_METRICS_PASSWORD",
            "The basic-auth password for --user; without it the password is prompted for.",
        ),
    ),
}
SEE_ALSO: Final = ("systemctl(1)", "journalctl(1)", "nvidia-smi(1)")
# --------------------------------------------------------------------------- roff


def roff_escape(text: str) -> str:
    """Text safe inside a roff line: backslashes, minus signs, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _bold(text: str) -> str:
    return f"\\fB{roff_escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{roff_escape(text)}\\fR"


def _value(option: Option) -> str:
    """The value part of an option: `` METAVAR``, `` [METAVAR]``, ``{a,b}``."""
    if option.metavar is None:
        return ""
    shown = _italic(option.metavar)
    if option.optional_value:
        return f" [{shown}]"
    if option.repeats and option.flags:
        return f" {shown} ..."
    return f" {shown}"


def _synopsis(command: Command) -> list[str]:
    words = [_bold(PROG)] + ([_bold(command.name)] if command.name else [])
    for option in command.options:
        if option.flags and option.flags[0] in ("-h", "--help", "--version"):
            continue
        if option.flags:
            words.append(
                f"[{_bold(option.flags[-1] if option.flags[-1].startswith('--') else option.flags[0])}{_value(option)}]"
            )
        else:
            shown = _italic(option.metavar or "")
            words.append(f"[{shown}]" if option.optional_value else shown)
    if not command.name:
        words.append(_italic("COMMAND") + " [" + _italic("OPTION") + "...]")
    return [".SH SYNOPSIS", " ".join(words)]


def _paragraphs(text: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", text.strip()):
        if block.strip():
            yield " ".join(line.strip() for line in block.splitlines())


def _option_lines(option: Option) -> list[str]:
    if option.flags:
        head = ", ".join(_bold(flag) + _value(option) for flag in option.flags)
    else:
        head = _italic(option.metavar or "")
    help_text = option.help[:1].upper() + option.help[1:] if option.help else ""
    if help_text and not help_text.endswith("."):
        help_text += "."
    if option.choices:
        help_text += " One of: " + ", ".join(option.choices) + "."
    if option.repeats:
        help_text += " May be given more than once." if not option.metavar or option.flags else ""
    return [".TP", head, roff_escape(help_text)]


def _exit_status(command: Command) -> list[str]:
    codes = COMMAND_EXIT_CODES.get(command.name, tuple(EXIT_MEANINGS))
    lines = [".SH EXIT STATUS"]
    for code in sorted(codes):
        lines += [".TP", f".B {code}", roff_escape(EXIT_MEANINGS[code][:1].upper() + EXIT_MEANINGS[code][1:] + ".")]
    return lines


def _sentence(text: str) -> str:
    """``text`` with a capital first letter and a full stop."""
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _summary(command: Command) -> str:
    """The NAME line's description: the help line, lower-case first letter, no full stop."""
    text = (command.help or command.description).rstrip(".")
    return text[:1].lower() + text[1:]


def render_page(command: Command, all_commands: Sequence[Command]) -> str:
    """The roff source of one man page."""
    title = command.page.upper()
    lines = [
        f".\\\" Generated by python -m governor.manpage from {PROG}'s argument parser: do not edit.",
        f'.TH {roff_escape(title)} 1 "" "{PROG} {__version__}" "User Commands"',
        ".nh",  # no hyphenation: command and option names are copied from the page
        ".ad l",  # ragged right: no wide gaps around long names
        ".SH NAME",
        f"{roff_escape(command.page)} \\- {roff_escape(_summary(command))}",
        *_synopsis(command),
        ".SH DESCRIPTION",
    ]
    description = command.description or _sentence(command.help)
    for paragraph in [description, *_paragraphs(EXTRA_DESCRIPTION.get(command.name, ""))]:
        lines += [roff_escape(paragraph), ".PP"]
    lines.pop()
    epilog = [p for p in _paragraphs(command.epilog) if not p.lower().startswith("exit codes:")]
    for paragraph in epilog:
        lines += [".PP", roff_escape(paragraph)]
    if not command.name:
        lines.append(".SH COMMANDS")
        for other in all_commands[1:]:
            lines += [
                ".TP",
                _bold(other.name),
                roff_escape(other.help[:1].upper() + other.help[1:] + ".") + f" See {_bold(other.page)}(1).",
            ]
    lines.append(".SH OPTIONS")
    for option in command.options:
        lines += _option_lines(option)
    lines += _exit_status(command)
    for name, text in ENVIRONMENT.get(command.name, ()):
        lines += [".SH ENVIRONMENT", ".TP", _bold(name), roff_escape(text)]
    if command.name in ("", "run", "check-config"):
        lines.append(".SH FILES")
        for path, text in FILES:
            lines += [".TP", _italic(path), roff_escape(text)]
    refs = [c.page for c in all_commands if c.page != command.page]
    refs = ([PROG] if command.name else refs) + list(SEE_ALSO)
    lines += [
        ".SH SEE ALSO",
        ",\n".join(
            f"{_bold(ref.split('(')[0])}({ref.split('(')[1]}" if "(" in ref else f"{_bold(ref)}(1)" for ref in refs
        ),
    ]
    lines += [
        ".PP",
        roff_escape(f"README.md and docs/ of the source, installed by the package in /usr/share/doc/{PROG}."),
    ]
    return "\n".join(lines) + "\n"


def man_pages(parser: argparse.ArgumentParser) -> dict[str, str]:
    """File name (``gpu-governor-run.1``) -> roff source, one page per command and one for the program."""
    every = commands(parser)
    return {f"{c.page}.1": render_page(c, every) for c in every}


# --------------------------------------------------------------------------- files


def generated_files(parser: argparse.ArgumentParser) -> dict[Path, str]:
    """Every generated file, by its path relative to the repository (or install prefix)."""
    from governor.completion import bash_completion

    files = {MAN_DIR / name: text for name, text in man_pages(parser).items()}
    files[COMPLETION_FILE] = bash_completion(parser)
    return files


def stale_files(root: Path, files: dict[Path, str]) -> list[str]:
    """Paths under ``root`` that differ from ``files``, are missing, or are pages no command has."""
    problems = [str(path) for path, text in files.items() if _read(root / path) != text]
    known = {path.name for path in files}
    problems += [str(MAN_DIR / p.name) for p in sorted((root / MAN_DIR).glob("*.1")) if p.name not in known]
    return problems


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_files(root: Path, files: dict[Path, str]) -> None:
    """Write ``files`` under ``root`` and remove the pages of commands that no longer exist."""
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8")
    for page in (root / MAN_DIR).glob("*.1"):
        if MAN_DIR / page.name not in files:
            page.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m governor.manpage [--check] [--root DIR]``: write (or check) the generated files."""
    from governor.cli import build_parser

    cli = argparse.ArgumentParser(prog="python -m governor.manpage", description=__doc__.splitlines()[0])
    cli.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="repository root")
    cli.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = cli.parse_args(argv)
    files = generated_files(build_parser())
    if args.check:
        stale = stale_files(args.root, files)
        for name in stale:
            sys.stderr.write(f"{name}: out of date; run python -m governor.manpage\n")
        return 1 if stale else 0
    write_files(args.root, files)
    for path in files:
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
