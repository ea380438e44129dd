"""PyYAML's safe loader made strict for the web-config file: no aliases, no duplicate keys.

Its own module so that the daemon imports PyYAML only when a web-config file is in use.
"""

from __future__ import annotations

from typing import Any

import yaml

from governor.errors import ConfigError, ConfigIssue
from governor.schema import config_text, short


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases and duplicate keys."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a web-config file", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
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
