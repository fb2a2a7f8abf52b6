"""Reading YAML (experiment configs, task files) with one loader: one-line errors naming the file and line.

PyYAML's `safe_load` keeps the last of two equal keys without a word (a typo'd copy of a field silently wins) and
expands aliases without a bound (a few hundred bytes of nested aliases make a billion values, and any message
that shows them a line of hundreds of megabytes). It has no option for either, hence `BoundedLoader`, a SafeLoader
whose `construct_mapping` refuses a repeated key naming it and its line, and `read_yaml`, which measures what the
composed document's aliases expand to (each shared node counted once per use, in time linear in the file) and
refuses more than `MAX_VALUES` before anything is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from probing.core.errors import ProbingError

MAX_VALUES = 100_000  # nodes of a document once its aliases are expanded (a config holds a few hundred)
MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(yaml.YAMLError):
    def __init__(self, line: int | None, message: str):
        super().__init__(message)
        self.line, self.message = line, message


class BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (merge keys `<<` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue  # complex keys: SafeLoader refuses the unhashable ones itself
            key = self.construct_object(key_node)
            if key in seen:
                raise _Refused(key_node.start_mark.line + 1, f"field {_shown(key)} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _shown(key: Any) -> str:
    text = str(key)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def expanded_size(root: yaml.Node, limit: int = MAX_VALUES) -> int:
    """The number of nodes `root` stands for once every alias is expanded, computed over the shared nodes once
    each (iteratively: no recursion limit); a document larger than `limit`, or one that contains itself
    through an alias, is refused."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # entered, not finished: the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > limit:
                raise _Refused(None, f"its aliases expand to more than {limit:,} values")
            continue
        if key in sizes:
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise _Refused(child.start_mark.line + 1, "an alias refers to a node that contains it")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def read_text(path: Path, prefix: str = "") -> str:
    """A file's UTF-8 text; a missing file, a folder or a non-UTF-8 byte is one line naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ProbingError(f"{prefix}{path}: file not found") from None
    except IsADirectoryError:
        raise ProbingError(f"{prefix}{path}: a folder, not a file") from None
    except PermissionError:
        raise ProbingError(f"{prefix}{path}: permission denied") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ProbingError(
            f"{prefix}{path}: line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})"
        ) from None


def parse_yaml(text: str, path: Path | str) -> tuple[Any, yaml.Node | None]:
    """(data, composed node) of a YAML document, through `BoundedLoader`; errors are one line naming `path`."""
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        expanded_size(node)
        return loader.construct_document(node), node
    except _Refused as refused:
        line = f"line {refused.line}: " if refused.line is not None else ""
        raise ProbingError(f"{path}: {line}{refused.message}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ProbingError(f"{path}: {line}not valid YAML ({getattr(error, 'problem', None) or error})") from None
    except RecursionError:
        raise ProbingError(f"{path}: nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(path: Path, prefix: str = "") -> tuple[Any, yaml.Node | None]:
    """(data, composed node) of a YAML file (see `parse_yaml`)."""
    return parse_yaml(read_text(path, prefix), path)
