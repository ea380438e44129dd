"""What the command line offers, read from the argument parser: commands and their options.

The one description of :func:`governor.cli.build_parser` that the man pages
(:mod:`governor.manpage`) and the bash completion (:mod:`governor.completion`) are
generated from, so that neither can drift from the parser.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PROG: Final = "gpu-governor"
_PATH_TYPES: Final = (Path,)
PATH_DESTS: Final = frozenset({"cacert", "web_config_file"})
"""Options that take a file although the parser keeps them as text (completed as files)."""


@dataclass(frozen=True, slots=True)
class Option:
    """One argument of a command, as documented and completed."""

    flags: tuple[str, ...]  # empty for a positional
    metavar: str | None  # None for a flag that takes no value
    help: str
    choices: tuple[str, ...]
    takes_path: bool
    optional_value: bool  # nargs="?": the value may be left out
    repeats: bool  # nargs="+" / "*" / append


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand (or the program itself, ``name == ""``) and its options."""

    name: str
    help: str
    description: str
    epilog: str
    options: tuple[Option, ...]

    @property
    def page(self) -> str:
        """The man page's name: ``gpu-governor`` or ``gpu-governor-COMMAND``."""
        return f"{PROG}-{self.name}" if self.name else PROG


def _option(action: argparse.Action) -> Option | None:
    """The documented form of one argparse action; None for a suppressed one."""
    if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
        return None
    takes_value = action.nargs != 0
    if isinstance(action, (argparse._VersionAction, argparse._HelpAction)):
        takes_value = False
    choices = tuple(str(c) for c in action.choices) if action.choices is not None else ()
    metavar = action.metavar if isinstance(action.metavar, str) else None
    if takes_value and metavar is None:
        if choices:
            metavar = "{" + ",".join(choices) + "}"
        else:
            metavar = action.dest.upper() if action.option_strings else action.dest
    return Option(
        flags=tuple(action.option_strings),
        metavar=metavar if takes_value else None,
        help=_expand(action),
        choices=choices,
        takes_path=action.type in _PATH_TYPES or action.dest in PATH_DESTS,
        optional_value=action.nargs == "?",
        repeats=action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction),
    )


def _expand(action: argparse.Action) -> str:
    """The help text with argparse's ``%(default)s``-style fields filled in, as --help shows it."""
    text = action.help or ""
    if "%(" not in text:
        return text
    return text % {**vars(action), "default": action.default, "prog": PROG}


def _options(parser: argparse.ArgumentParser) -> tuple[Option, ...]:
    return tuple(o for o in map(_option, parser._actions) if o is not None)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def commands(parser: argparse.ArgumentParser) -> list[Command]:
    """The program (first) and each subcommand, in the parser's order."""
    sub = _subparsers(parser)
    helps = {a.dest: a.help or "" for a in sub._choices_actions} if sub is not None else {}
    result = [Command("", parser.description or "", "", parser.epilog or "", _options(parser))]
    if sub is not None:
        for name, child in sub.choices.items():
            result.append(
                Command(name, helps.get(name, ""), child.description or "", child.epilog or "", _options(child))
            )
    return result
