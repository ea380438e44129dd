"""The docs are true: the reference config holds every key of the schema; the README's CLI section is the parser's."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from governor.classes import MATCH_KEYS, ProcessClass, VramPolicy
from governor.cli import build_parser
from governor.config import GPU_SELECTORS, SCHEMA, Key, parse_config, parse_toml

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "config" / "governor.toml"

# A commented-out TOML line: "# key = value", "# [table]" or "# [[table]]" (prose never has " = " after one word).
_COMMENTED = re.compile(r"^#\s?((?:\[\[?[A-Za-z_.]+\]\]?)|(?:[A-Za-z_]+ = .+))$")


def uncommented(text: str) -> str:
    """The reference with its commented-out keys and tables turned back on."""
    return "\n".join(m.group(1) if (m := _COMMENTED.match(line)) else line for line in text.splitlines()) + "\n"


def config_key(field_name: str) -> str:
    """The config key a dataclass field is read from: sizes drop their ``_bytes`` (``budget = "6GiB"``)."""
    return field_name.removesuffix("_bytes")


def vram_keys() -> set[str]:
    """[vram] keys from VramPolicy's fields: its classes are [[class]] and its default class [vram.default]."""
    fields = {f.name for f in dataclasses.fields(VramPolicy) if f.metadata.get("config", True)}
    fields -= {"classes", "default_class"}
    return {config_key(f) for f in fields} | {"default"}


def class_keys(*, default: bool) -> set[str]:
    """[[class]] keys from ProcessClass's fields; [vram.default] has neither a name nor match rules."""
    keys = {config_key(f.name) for f in dataclasses.fields(ProcessClass)}
    return keys - {"name", "match"} if default else keys


def documented(document: dict[str, Any], path: str) -> set[str]:
    """The keys of the table at ``path`` (dotted; ``[0]`` takes an array's first table) in ``document``."""
    node: Any = document
    for part in path.split(".") if path else ():
        name, _, index = part.partition("[")
        node = node.get(name, {})
        if index:
            node = node[0] if node else {}
    assert isinstance(node, dict), path
    return set(node)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The reference config with every commented-out example key turned on."""
    return parse_toml(uncommented(REFERENCE.read_text()).encode(), f"{REFERENCE} (examples on)")


class TestReferenceConfig:
    def test_loads_as_it_is_and_with_every_example_on(self) -> None:
        """The reference is a valid config, and so is it with its commented keys on (no key the parser lacks)."""
        text = REFERENCE.read_text()
        parse_config(parse_toml(text.encode(), str(REFERENCE)), str(REFERENCE))
        on = f"{REFERENCE} (examples on)"
        parse_config(parse_toml(uncommented(text).encode(), on), on)

    def test_every_top_level_key_and_section_of_the_schema(self, document: dict[str, Any]) -> None:
        """Every key of config.SCHEMA, section by section, is in the reference (set or as `# key = value`)."""
        assert {name for name, spec in SCHEMA.items() if isinstance(spec, Key)} <= documented(document, "")
        for section, spec in SCHEMA.items():
            if isinstance(spec, dict):
                missing = set(spec) - documented(document, section)
                assert not missing, f"[{section}] lacks {sorted(missing)}"

    def test_gpu_overrides(self, document: dict[str, Any]) -> None:
        """The [[gpu]] example shows every selector and every override table."""
        missing = {*GPU_SELECTORS, "thermal", "power", "fan"} - documented(document, "gpu[0]")
        assert not missing, f"[[gpu]] lacks {sorted(missing)}"

    def test_vram_default_and_classes(self, document: dict[str, Any]) -> None:
        """[vram], [vram.default] and [[class]] (with every match key) hold every field the code reads."""
        for path, keys in (
            ("vram", vram_keys()),
            ("vram.default", class_keys(default=True)),
            ("class[0]", class_keys(default=False)),
            ("class[0].match", set(MATCH_KEYS)),
        ):
            missing = keys - documented(document, path)
            assert not missing, f"{path} lacks {sorted(missing)}"

    @pytest.mark.parametrize(
        "example",
        [
            "config/examples/rtx4070.toml",
            "config/examples/rtx4070-fan.toml",
            "config/examples/h100-server.toml",
            "config/examples/workstation-gaming.toml",
        ],
    )
    def test_shipped_examples_pass_check_config_without_warnings(self, example: str) -> None:
        """check-config accepts each shipped example and warns about nothing (no overlapping classes)."""
        result = subprocess.run(
            [sys.executable, "-m", "governor", "check-config", str(REPO / example)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )
        assert (result.returncode, result.stderr) == (0, "")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no subcommands")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every long spelling of each option (the exporter-style ones too), or the only spelling, without --help."""
    out: set[str] = set()
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            long = [o for o in action.option_strings if o.startswith("--")]
            out.update(long or action.option_strings)
    return out


def readme_cli() -> dict[str, set[str]]:
    """From the README's "Command line" section: each `gpu-governor SUB ...` line's --options."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    section = section.split("```", 2)[1]  # the synopsis block; later examples show output
    lines: dict[str, set[str]] = {}
    for line in section.splitlines():
        m = re.match(r"gpu-governor (\S+)(.*)", line)
        if m:
            usage = m.group(2).split("  #")[0]
            lines.setdefault(m.group(1), set()).update(re.findall(r"--[a-z][a-z.-]*[a-z]", usage))
    return lines


class TestReadmeCommandLine:
    def test_every_subcommand_and_option_is_in_the_readme_and_nothing_else(self) -> None:
        """The README's CLI section lists each subcommand with exactly the parser's options."""
        parser = build_parser()
        readme = readme_cli()
        assert readme.pop("--version", None) is not None, "gpu-governor --version"
        expected = {name: _options(sub) for name, sub in _subcommands(parser).items()}
        assert set(readme) == set(expected)
        for name, options in expected.items():
            got = sorted(readme[name])
            assert readme[name] == options, f"gpu-governor {name}: README {got}, parser {sorted(options)}"
