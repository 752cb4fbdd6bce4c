"""Flatten nested samples into leaves and rebuild batches in the samples' structure.

A sample is a leaf (tensor, numpy array or scalar, Python number) or a dict, tuple,
namedtuple or list nesting them. Every sample of a stream must have the first sample's
structure; the batch comes back in that structure with each leaf stacked, as
``torch.utils.data.default_collate`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidSampleError

__all__ = ["MAX_DEPTH", "NestingTooDeep", "TreeDef", "describe_structure", "flatten", "unflatten"]

LEAF = "leaf"


@dataclass(frozen=True)
class TreeDef:
    """The shape of a nested sample, without its leaves. Equal tree defs batch together."""

    kind: str  # "leaf", "dict", "tuple", "list" or "namedtuple"
    keys: tuple[Any, ...] = ()  # dict keys, in order
    node_type: type | None = None  # the namedtuple class, or a mapping's when not dict
    children: tuple[TreeDef, ...] = ()

    def leaf_paths(self, prefix: str = "") -> list[str]:
        """Paths like ``['image'][0]``, in flatten order."""
        if self.kind == LEAF:
            return [prefix]
        labels = self.keys if self.kind == "dict" else range(len(self.children))
        paths: list[str] = []
        for label, child in zip(labels, self.children, strict=True):
            paths.extend(child.leaf_paths(f"{prefix}[{label!r}]"))
        return paths


_LEAF_DEF = TreeDef(LEAF)


def _is_namedtuple(value: object) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


class NestingTooDeep(ValueError):
    """A sample (or output) with more than MAX_DEPTH containers inside one another."""


# Deeper than any real sample; well within Python's recursion limit for the walks below.
MAX_DEPTH = 100


def flatten(sample: Any, leaves: list[Any]) -> TreeDef:
    """Appends the leaves of ``sample`` to ``leaves`` and returns its tree def; raises
    NestingTooDeep past MAX_DEPTH levels (a cycle, e.g. a list holding itself, included)."""
    return _flatten(sample, leaves, 0)


def _flatten(sample: Any, leaves: list[Any], depth: int) -> TreeDef:
    if isinstance(sample, (Mapping, tuple, list)) and depth == MAX_DEPTH:
        raise NestingTooDeep(
            f"nested more than {MAX_DEPTH} levels deep (dicts, tuples and lists inside one "
            "another); dynbatch batches samples nested up to that depth"
        )
    if isinstance(sample, Mapping):
        keys = tuple(sample.keys())
        children = tuple(_flatten(sample[key], leaves, depth + 1) for key in keys)
        kind = type(sample)
        return TreeDef(
            "dict", keys=keys, node_type=None if kind is dict else kind, children=children
        )
    if isinstance(sample, tuple):
        children = tuple(_flatten(item, leaves, depth + 1) for item in sample)
        if _is_namedtuple(sample):
            return TreeDef("namedtuple", node_type=type(sample), children=children)
        return TreeDef("tuple", children=children)
    if isinstance(sample, list):
        return TreeDef("list", children=tuple(_flatten(item, leaves, depth + 1) for item in sample))
    leaves.append(sample)
    return _LEAF_DEF


def unflatten(treedef: TreeDef, leaves: list[Any]) -> Any:
    """Rebuilds the structure of ``treedef`` around ``leaves`` (consumed in order)."""
    iterator = iter(leaves)
    return _build(treedef, iterator)


def _build(treedef: TreeDef, leaves: Any) -> Any:
    if treedef.kind == LEAF:
        return next(leaves)
    children = [_build(child, leaves) for child in treedef.children]
    if treedef.kind == "dict":
        mapping = dict(zip(treedef.keys, children, strict=True))
        return (
            mapping if treedef.node_type is None else _as_mapping_type(treedef.node_type, mapping)
        )
    if treedef.kind == "tuple":
        return tuple(children)
    if treedef.kind == "namedtuple":
        assert treedef.node_type is not None
        return treedef.node_type(*children)
    return children


# Mapping types that cannot be built from a dict (their first argument means something else):
# their batches are plain dicts. Learned once per type.
_unbuildable_mappings: set[type] = set()


def _as_mapping_type(kind: type, mapping: dict[Any, Any]) -> Any:
    """The batch in the samples' own mapping type (a transformers BatchEncoding, an
    OrderedDict...) when that type can be built from a dict."""
    if kind in _unbuildable_mappings:
        return mapping
    try:
        rebuilt = kind(mapping)
    except Exception:  # any constructor that does not take a dict: fall back, once per type
        _unbuildable_mappings.add(kind)
        return mapping
    if not isinstance(rebuilt, Mapping) or list(rebuilt.keys()) != list(mapping):
        _unbuildable_mappings.add(kind)
        return mapping
    return rebuilt


def describe_structure(treedef: TreeDef) -> str:
    if treedef.kind == LEAF:
        return "a leaf"
    if treedef.kind == "dict":
        name = "dict" if treedef.node_type is None else treedef.node_type.__name__
        return f"a {name} with keys {list(treedef.keys)!r}"
    if treedef.kind == "namedtuple":
        assert treedef.node_type is not None
        return f"a {treedef.node_type.__name__} of {len(treedef.children)}"
    return f"a {treedef.kind} of {len(treedef.children)}"


def structure_mismatch(
    index: int, expected: TreeDef, actual: TreeDef, first_index: int
) -> InvalidSampleError:
    """The error for a sample whose structure differs, naming the first place it differs."""
    path = ""
    while True:
        differs = (
            expected.kind != actual.kind
            or expected.keys != actual.keys
            or expected.node_type is not actual.node_type
            or len(expected.children) != len(actual.children)
        )
        if differs:
            hint = (
                "; a list of numbers is a structure of separate leaves: for a sequence (token "
                "ids, say) pass torch.tensor(ids), with collate='pad' for different lengths"
                if expected.kind == actual.kind == "list"
                and all(child.kind == LEAF for child in (*expected.children, *actual.children))
                else ""
            )
            return InvalidSampleError(
                index,
                path,
                f"structure differs from sample {first_index}: expected "
                f"{describe_structure(expected)}, got {describe_structure(actual)}{hint}",
            )
        labels = expected.keys if expected.kind == "dict" else range(len(expected.children))
        for label, want, got in zip(labels, expected.children, actual.children, strict=True):
            if want != got:
                path += f"[{label!r}]"
                expected, actual = want, got
                break
        else:  # pragma: no cover - only called when the tree defs differ
            return InvalidSampleError(index, path, "structure differs")
