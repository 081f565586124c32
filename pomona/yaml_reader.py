"""YAML with line numbers: the document as mappings and lists that remember where each value was.

PyYAML's plain loader forgets where things were; we compose the node tree ourselves so every
value keeps its line, and so duplicate keys (which PyYAML silently collapses) can be reported.
`Reader` holds the validation helpers that raise `ConfigError` naming the file, line and field
path; `pomona.config` owns the schema built on them.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from typing import Any, NoReturn

import yaml

from pomona.errors import ConfigError


class LineMap(dict):
    line: int
    key_lines: dict[Any, int]


class LineList(list):
    item_lines: list[int]


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class Reader:
    """Validation helpers that all raise ConfigError mentioning the file, line and field path."""

    def __init__(self, shown_path: str) -> None:
        self.shown_path = shown_path

    def fail(self, path: str, line: int | None, problem: str) -> NoReturn:
        where = self.shown_path if line is None else f"{self.shown_path}, line {line}"
        raise ConfigError(f"{where}: {path}: {problem}" if path else f"{where}: {problem}")

    def bad(self, parent: LineMap, key: Any, path: str, problem: str) -> NoReturn:
        """Fail at `parent[key]`, a value of the mapping at `path`."""
        self.fail(join(path, key), parent.key_lines[key], problem)

    def convert(self, loader: yaml.SafeLoader, node: yaml.Node, path: str) -> Any:
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # resolves `<<: *anchor` merges
            result = LineMap()
            result.line, result.key_lines = _line(node), {}
            for key_node, value_node in node.value:
                key = self.convert(loader, key_node, path)
                if not isinstance(key, str | int | float | bool):
                    self.fail(path, _line(key_node), "keys must be plain names")
                child = join(path, key)
                if key in result:
                    first = result.key_lines[key]
                    self.fail(
                        child, _line(key_node), f"duplicate key (first given on line {first})"
                    )
                result[key] = self.convert(loader, value_node, child)
                result.key_lines[key] = _line(key_node)
            return result
        if isinstance(node, yaml.SequenceNode):
            items = LineList()
            items.item_lines = []
            for index, item in enumerate(node.value):
                items.append(self.convert(loader, item, f"{path}[{index}]"))
                items.item_lines.append(_line(item))
            return items
        try:
            return loader.construct_object(node)
        except yaml.YAMLError as error:
            self.fail(path, _line(node), f"cannot read this value: {error}")

    def keys(
        self, value: LineMap, path: str, allowed: Collection[str], required: Collection[str] = ()
    ) -> None:
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
                hint = (
                    f"did you mean '{close[0]}'?"
                    if close
                    else "valid keys here: " + ", ".join(allowed)
                )
                self.fail(join(path, key), value.key_lines[key], f"unknown key; {hint}")
        for key in required:
            if key not in value:
                self.fail(path, value.line, f"missing required key '{key}'")

    def mapping(self, value: Any, path: str, line: int | None) -> LineMap:
        if not isinstance(value, LineMap):
            self.fail(path, line, f"must be a mapping of `key: value` lines, not {kind(value)}")
        return value

    def block(self, parent: LineMap, key: str, path: str) -> LineMap:
        return self.mapping(parent[key], join(path, key), parent.key_lines[key])

    def string(self, parent: LineMap, key: str, path: str, default: Any = None) -> Any:
        if key not in parent:
            return default
        value = parent[key]
        if not isinstance(value, str) or not value.strip():
            self.bad(parent, key, path, f"must be a non-empty string, not {kind(value)}")
        return value

    def integer(
        self, parent: LineMap, key: str, path: str, default: Any, low: int, high: int | None = None
    ) -> Any:
        if key not in parent:
            return default
        value = parent[key]
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        if not is_int(value) or value < low or (high is not None and value > high):
            is_quoted_number = isinstance(value, str) and value.strip().isdigit()
            hint = "; remove the quotes" if is_quoted_number else ""
            self.bad(parent, key, path, f"must be a whole number {span}, not {kind(value)}{hint}")
        return value

    def port(self, parent: LineMap, key: str, path: str, default: Any = None) -> Any:
        return self.integer(parent, key, path, default, 1, 65535)


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `yes` is a bool


def kind(value: Any) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, LineMap):
        return "a mapping"
    if isinstance(value, LineList):
        return f"the list {list(value)!r}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    return repr(value)


def compose(reader: Reader, text: str) -> tuple[Any, int]:
    """The document as LineMap/LineList/scalars, and the line where it starts."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # rejects control characters already
        root_node = loader.get_single_node()
        if root_node is None:
            reader.fail("", None, "the file is empty; it needs at least a `nodes:` list")
        return reader.convert(loader, root_node, ""), _line(root_node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = error.problem or "syntax error"
        if error.context:  # "expected a single document..." reads first; "while parsing..." after
            expected = error.context.startswith("expected")
            started = (
                f" started on line {error.context_mark.line + 1}" if error.context_mark else ""
            )
            context = f"{error.context}{started}"
            problem = f"{error.context} {problem}" if expected else f"{problem} ({context})"
        hint = "; check indentation and quoting around this line"
        reader.fail("", mark.line + 1 if mark else None, f"not valid YAML: {problem}{hint}")
    except yaml.YAMLError as error:
        reader.fail("", None, f"not valid YAML: {error}")
    finally:
        if loader is not None:
            loader.dispose()
