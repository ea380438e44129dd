"""PyYAML's safe loader made strict for the web-config file: no aliases, no merge keys, no
duplicate keys, at most ``MAX_YAML_NODES`` values nested at most ``MAX_YAML_DEPTH`` deep.

PyYAML's loader is pure Python (about 70 us per value here): the caps keep a hostile or
corrupt file's parse to a fraction of a second; it is refused at the first value over them.

Its own module so that the daemon imports PyYAML only when a web-config file is in use.
"""

from __future__ import annotations

from typing import Any

import yaml

from governor.errors import ConfigError, ConfigIssue
from governor.schema import config_text, short

MAX_YAML_NODES = 4096
"""Values (scalars, lists, mappings; keys included) in one web-config document: 2000 users fit."""
MAX_YAML_DEPTH = 32
"""Levels of nesting in one web-config document (the format needs 3)."""
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases, merge keys, duplicate keys and documents over the caps."""

    _nodes = 0
    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a web-config file", event.start_mark
            )
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"a web-config file holds at most {MAX_YAML_NODES} values", event.start_mark
            )
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"a web-config file is nested at most {MAX_YAML_DEPTH} levels deep", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                # With aliases refused a merge only hides keys: one it brings in is dropped
                # silently where the mapping has it too (a duplicate by another name).
                raise yaml.constructor.ConstructorError(
                    None, None, "merge keys (<<) are not allowed in a web-config file", key_node.start_mark
                )
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short(key_node.value)!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(data: bytes, source: str) -> Any:
    """The YAML document in ``data`` (UTF-8); ConfigError naming ``source`` when it is not one."""
    text = config_text(data, source, "YAML")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError([ConfigIssue(source, "", "valid YAML", short(detail, 200))]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue(source, "", "YAML nested a few levels deep", "deeper nesting")]) from None
