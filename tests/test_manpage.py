"""Man pages and bash completion generated from the parser: complete, current, rendered cleanly, shipped.

The pages and the completion script are committed under share/ (python -m governor.manpage
writes them); these tests fail when a subcommand or option has no entry, when a committed
file differs from what the parser generates now, when groff warns about a page, and when
the wheel lacks them. The completion is run in a real bash.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from governor import cli, errors
from governor.cli import build_parser
from governor.completion import bash_completion
from governor.manpage import (
    COMMAND_EXIT_CODES,
    COMPLETION_FILE,
    EXIT_MEANINGS,
    MAN_DIR,
    generated_files,
    main,
    man_pages,
    roff_escape,
    stale_files,
)
from tests.support import require_tool

REPO = Path(__file__).resolve().parent.parent
PAGES = REPO / MAN_DIR
COMPLETION = REPO / COMPLETION_FILE


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Subcommand name -> its parser, read from the parser itself (not from the generator)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def section(page: str, name: str) -> str:
    """The roff text of one section (.SH NAME up to the next .SH)."""
    match = re.search(rf"^\.SH {name}\n(.*?)(?=^\.SH |\Z)", page, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no {name} section"
    return match.group(1)


def render(page: Path) -> subprocess.CompletedProcess[str]:
    """``man --warnings -l PAGE`` (groff with warnings on), as plain text at 80 columns (overstrike removed)."""
    result = subprocess.run(
        [require_tool("man"), "--warnings", "-E", "UTF-8", "-l", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LC_ALL": "C.UTF-8"},
    )
    result.stdout = re.sub(r".\x08", "", result.stdout)
    return result


class TestPagesFollowTheParser:
    def test_committed_files_are_what_the_parser_generates(self) -> None:
        """share/ holds exactly the generated pages and completion: none stale, none missing, none extra."""
        assert stale_files(REPO, generated_files(build_parser())) == []
        assert main(["--check", "--root", str(REPO)]) == 0

    def test_every_subcommand_has_a_page(self) -> None:
        """Each subcommand of the real parser has gpu-governor-COMMAND.1, and the program has gpu-governor.1."""
        names = set(subparsers(build_parser()))
        assert {"run", "check-config", "status", "record", "calibrate", "replay", "simulate", "hash-password"} <= names
        pages = {p.name for p in PAGES.glob("*.1")}
        assert pages == {"gpu-governor.1"} | {f"gpu-governor-{name}.1" for name in names}

    def test_every_option_and_argument_has_an_entry(self) -> None:
        """Every option string and positional of every subcommand is an entry in its page's OPTIONS section."""
        for name, parser in subparsers(build_parser()).items():
            options = section((PAGES / f"gpu-governor-{name}.1").read_text(), "OPTIONS")
            for action in parser._actions:
                for flag in action.option_strings:
                    assert f"\\fB{roff_escape(flag)}\\fR" in options, (name, flag)
                if not action.option_strings:
                    shown = action.metavar if isinstance(action.metavar, str) else action.dest
                    assert f"\\fI{roff_escape(shown)}\\fR" in options, (name, action.dest)
                if action.help:
                    first_words = roff_escape(action.help.split()[0].lstrip("(")[1:])
                    assert first_words in options, (name, action.dest)

    def test_a_new_option_makes_the_committed_page_stale(self) -> None:
        """Adding an option to a subcommand makes the check name that command's page out of date."""
        parser = build_parser()
        subparsers(parser)["status"].add_argument("--brand-new", help="an option nobody documented")
        assert stale_files(REPO, generated_files(parser)) == [
            str(MAN_DIR / "gpu-governor-status.1"),
            str(COMPLETION_FILE),
        ]

    def test_a_new_subcommand_without_a_page_is_caught(self, tmp_path: Path) -> None:
        """A subcommand the parser gains has no committed page: the check names the missing file; writing fixes it."""
        parser = build_parser()
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        action.add_parser("frobnicate", help="a command nobody documented")
        stale = stale_files(REPO, generated_files(parser))
        assert str(MAN_DIR / "gpu-governor-frobnicate.1") in stale
        assert str(MAN_DIR / "gpu-governor.1") in stale  # its COMMANDS list too
        root = tmp_path / "root"
        shutil.copytree(REPO / "share", root / "share")
        (root / MAN_DIR / "gpu-governor-gone.1").write_text(".TH X 1\n")
        assert str(MAN_DIR / "gpu-governor-gone.1") in stale_files(root, generated_files(build_parser()))

    def test_the_main_page_lists_every_command(self) -> None:
        """gpu-governor.1's COMMANDS section names each subcommand and points to its page."""
        commands = section((PAGES / "gpu-governor.1").read_text(), "COMMANDS")
        for name in subparsers(build_parser()):
            assert f"\\fB{roff_escape(name)}\\fR" in commands
            assert f"\\fBgpu\\-governor\\-{roff_escape(name)}\\fR(1)" in commands


class TestExitStatus:
    def test_the_table_is_every_exit_code_of_governor_errors(self) -> None:
        """EXIT_MEANINGS documents exactly the EXIT_* constants of governor.errors."""
        constants = {getattr(errors, n) for n in dir(errors) if n.startswith("EXIT_")}
        assert set(EXIT_MEANINGS) == constants
        assert {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 130, 141} <= constants

    def test_the_table_matches_the_cli_docstring(self) -> None:
        """The codes in governor.cli's docstring table are the codes the pages document."""
        doc = cli.__doc__ or ""
        table = {int(m) for m in re.findall(r"^(\d+)\s{2,}\S", doc, flags=re.MULTILINE)}
        assert table == set(EXIT_MEANINGS)

    def test_every_page_has_an_exit_status_section(self) -> None:
        """Each page has EXIT STATUS with its command's codes; gpu-governor.1 lists all of them."""
        for name in ["", *subparsers(build_parser())]:
            page = (PAGES / (f"gpu-governor-{name}.1" if name else "gpu-governor.1")).read_text()
            codes = [int(c) for c in re.findall(r"^\.B (\d+)$", section(page, "EXIT STATUS"), flags=re.MULTILINE)]
            assert codes == sorted(COMMAND_EXIT_CODES.get(name, tuple(EXIT_MEANINGS))), name
            assert {0, 1, 2} <= set(codes), name
        assert set(COMMAND_EXIT_CODES) == set(subparsers(build_parser()))
        status = section((PAGES / "gpu-governor-status.1").read_text(), "EXIT STATUS")
        assert ".B 7\n" in status and ".B 8\n" in status and ".B 9\n" in status

    def test_status_codes_agree_with_its_help_epilog(self) -> None:
        """The codes `status --help` lists are documented on its page (7, 8, 9 are status-only)."""
        epilog = subparsers(build_parser())["status"].epilog or ""
        listed = {int(c) for c in re.findall(r"^\s+(\d+)\s", epilog.split("exit codes:", 1)[1], flags=re.MULTILINE)}
        assert listed <= set(COMMAND_EXIT_CODES["status"])
        for other, codes in COMMAND_EXIT_CODES.items():
            if other != "status":
                assert not {7, 8, 9} & set(codes), other


class TestRoff:
    def test_escape(self) -> None:
        """Backslashes, minus signs and a leading dot or quote cannot be read as roff requests."""
        assert roff_escape("a-b") == "a\\-b"
        assert roff_escape("C:\\x") == "C:\\ex"
        assert roff_escape(".SH x") == "\\&.SH x"
        assert roff_escape("'x") == "\\&'x"

    def test_groff_renders_every_page_without_warnings(self) -> None:
        """`man --warnings -l` prints nothing on stderr for any page, and the text shows each section."""
        pages = sorted(PAGES.glob("*.1"))
        assert len(pages) >= 9
        for page in pages:
            result = render(page)
            assert result.returncode == 0, (page.name, result.stderr)
            assert result.stderr == "", (page.name, result.stderr)
            for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "SEE ALSO"):
                assert re.search(rf"^{heading}$", result.stdout, flags=re.MULTILINE), (page.name, heading)

    def test_the_warning_check_catches_bad_roff(self, tmp_path: Path) -> None:
        """A page with an unknown macro makes groff warn on stderr (so the check above can fail)."""
        page = tmp_path / "bad.1"
        page.write_text((PAGES / "gpu-governor-run.1").read_text() + ".NOSUCHMACRO x\n")
        assert render(page).stderr != ""

    def test_help_text_reaches_the_page(self) -> None:
        """The rendered run page shows an option's help as --help does (--dry-run's sentence)."""
        text = render(PAGES / "gpu-governor-run.1").stdout
        assert "--dry-run" in text
        assert "Decide and log every action, but take none" in " ".join(text.split())

    def test_pages_are_generated_in_memory_from_any_parser(self) -> None:
        """man_pages() of a small parser gives one page per command, option help included."""
        parser = argparse.ArgumentParser(prog="gpu-governor", description="Test.")
        sub = parser.add_subparsers(dest="command")
        one = sub.add_parser("one", help="do one thing")
        one.add_argument("--level", choices=["a", "b"], help="how much")
        pages = man_pages(parser)
        assert set(pages) == {"gpu-governor.1", "gpu-governor-one.1"}
        assert "\\fB\\-\\-level\\fR \\fI{a,b}\\fR\nHow much. One of: a, b." in pages["gpu-governor-one.1"]


class TestWheel:
    def test_wheel_carries_the_pages_and_the_completion(self, tmp_path: Path) -> None:
        """A wheel built from the tree installs share/man/man1/*.1 and the bash completion under the prefix."""
        pytest.importorskip("build")
        pytest.importorskip("wheel")
        files = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.split(b"\0")
        src = tmp_path / "src"
        for name in filter(None, files):
            path = REPO / name.decode()
            if path.is_file():
                (src / name.decode()).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, src / name.decode())
        subprocess.run(
            [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)],
            capture_output=True,
            check=True,
            timeout=300,
        )
        (wheel,) = (tmp_path / "dist").glob("*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        data = "gpu_governor-" + wheel.name.split("-")[1] + ".data/data/"
        for page in PAGES.glob("*.1"):
            assert f"{data}share/man/man1/{page.name}" in names
        assert f"{data}{COMPLETION_FILE}" in names


def complete(words: list[str], tmp_path: Path, script: str | None = None) -> list[str]:
    """What the completion offers in a real bash for the command line ``words`` (the last is being typed)."""
    completion = tmp_path / "completion.bash"
    completion.write_text(COMPLETION.read_text() if script is None else script)
    line = " ".join(words)
    program = "\n".join(
        [
            f"source {completion}",
            "COMP_WORDS=(" + " ".join(f"'{w}'" for w in words) + ")",
            f"COMP_CWORD={len(words) - 1}",
            f"COMP_LINE='{line}'",
            f"COMP_POINT={len(line)}",
            "complete -p gpu-governor >/dev/null || exit 3",
            '_gpu_governor gpu-governor "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"',
            'printf "%s\\n" "${COMPREPLY[@]}"',
        ]
    )
    result = subprocess.run(
        [require_tool("bash"), "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


class TestBashCompletion:
    def test_script_is_what_the_parser_generates(self) -> None:
        """The committed completion is the generator's output for the real parser."""
        assert COMPLETION.read_text() == bash_completion(build_parser())

    def test_subcommands_after_the_program(self, tmp_path: Path) -> None:
        """`gpu-governor <TAB>` offers every subcommand; `gpu-governor st<TAB>` only status."""
        offered = complete(["gpu-governor", ""], tmp_path)
        assert set(subparsers(build_parser())) <= set(offered)
        assert complete(["gpu-governor", "st"], tmp_path) == ["status"]

    def test_options_of_the_subcommand(self, tmp_path: Path) -> None:
        """`gpu-governor run --<TAB>` offers exactly run's long options, and status's differ."""
        run = subparsers(build_parser())["run"]
        expected = {f for a in run._actions for f in a.option_strings if f.startswith("--")}
        assert set(complete(["gpu-governor", "run", "--"], tmp_path)) == expected
        assert "--json" in complete(["gpu-governor", "status", "--"], tmp_path)
        assert "--json" not in expected

    def test_choices_of_an_option(self, tmp_path: Path) -> None:
        """`run --log-format j<TAB>` offers json and journal; `--log-format=j<TAB>` the same."""
        assert sorted(complete(["gpu-governor", "run", "--log-format", "j"], tmp_path)) == ["journal", "json"]
        assert sorted(complete(["gpu-governor", "run", "--log-format", "=", "j"], tmp_path)) == ["journal", "json"]

    def test_files_where_a_path_is_taken(self, tmp_path: Path) -> None:
        """--config, --output, --cacert and replay's trace complete file names; --listen and --url do not."""
        (tmp_path / "gov.toml").write_text("")
        (tmp_path / "gpu-trace.jsonl").write_text("")
        assert complete(["gpu-governor", "run", "--config", "gov"], tmp_path) == ["gov.toml"]
        assert complete(["gpu-governor", "record", "-o", "gpu-t"], tmp_path) == ["gpu-trace.jsonl"]
        assert complete(["gpu-governor", "status", "--cacert", "gov"], tmp_path) == ["gov.toml"]
        assert complete(["gpu-governor", "replay", "gpu-"], tmp_path) == ["gpu-trace.jsonl"]
        assert complete(["gpu-governor", "run", "--listen", "gov"], tmp_path) == []
        assert complete(["gpu-governor", "status", "--url", "gov"], tmp_path) == []

    def test_a_second_subcommand_is_not_offered(self, tmp_path: Path) -> None:
        """After `status`, a bare word completes nothing (status takes no positional), not another command."""
        assert complete(["gpu-governor", "status", "r"], tmp_path) == []

    def test_a_broken_script_is_caught(self, tmp_path: Path) -> None:
        """A completion whose subcommand list lost a command offers less (the tests above can fail)."""
        broken = COMPLETION.read_text().replace("run check-config", "check-config", 1)
        assert "run" not in complete(["gpu-governor", ""], tmp_path, broken)
