"""YAML that cannot hurt: bounded in size, in alias expansion, and decoded with errors that
name the file, line and byte.

A 646-byte study can hold a "billion laughs" of aliases (``&a [*b, *b, ...]``) that expands to
millions of values and, once copied into a manifest, to hundreds of megabytes. Every YAML
file compkit reads (studies, budgets) goes through :func:`read_yaml`, which composes the node
graph first and refuses it when the values it would expand to exceed :data:`MAX_VALUES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kit.errors import CompkitError

#: Largest YAML file read (a study or budget is a few kilobytes).
MAX_BYTES = 1 << 20
#: Most values (scalars, lists, mappings) a document may expand to, aliases counted each time.
MAX_VALUES = 100_000


def _expanded_values(root: yaml.Node, limit: int) -> int:
    """Values the node graph expands to, aliases counted at every use; stops past ``limit``."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise CompkitError("a recursive YAML alias (a value that contains itself)")
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        on_path.discard(key)
        sizes[key] = total
        if total > limit:
            raise CompkitError(f"its YAML aliases expand to more than {limit:,} values")
        return total

    return size(root)


def read_yaml(path: str | Path, *, what: str, max_bytes: int = MAX_BYTES) -> Any:
    """Parse a YAML file safely (``yaml.SafeLoader``: no Python objects) within the bounds.

    Raises
    ------
    CompkitError
        ``"<what> <path>: ..."`` for a missing, oversized, non-UTF-8 or invalid file, or one
        whose aliases expand beyond :data:`MAX_VALUES` values.
    """
    path = Path(path)
    where = f"{what} {path}"
    if not path.is_file():
        raise CompkitError(f"{where}: no such file")
    size = path.stat().st_size
    if size > max_bytes:
        raise CompkitError(f"{where}: {size:,} bytes; compkit reads at most {max_bytes:,}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CompkitError(
            f"{where}, line {line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _expanded_values(node, MAX_VALUES)
        return yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise CompkitError(f"{where}: not valid YAML: {exc}") from exc
    except CompkitError as exc:
        raise CompkitError(f"{where}: refused: {exc}") from None
