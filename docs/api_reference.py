"""Writes docs/api.md, the API reference, from the package's docstrings and signatures.

    python docs/api_reference.py          # rewrite docs/api.md
    python docs/api_reference.py --check  # exit 1 if docs/api.md is stale (tests run this)

Every public name of each module below (its ``__all__``) is documented; a public name without
a docstring is an error, so the reference cannot silently lose an entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("api.md")
MODULES = [
    "dynbatch",
    "dynbatch.metrics",
    "dynbatch.distributed",
    "dynbatch.ray",
    "dynbatch.memory",
    "dynbatch.profiles",
]
HEADER = """# API reference

Generated from the docstrings by `python docs/api_reference.py`; a test fails when this file
and the code disagree. Start with the [quickstart](quickstart.md); [sizing](sizing.md) explains
how batch sizes are chosen.
"""


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _markdown(doc: str) -> str:
    """A docstring as Markdown: indented blocks become one code block, a ``Section:`` line
    over indented lines a list (``name: text`` items, deeper lines continuing them)."""
    out: list[str] = []
    code: list[str] = []  # adjacent indented blocks: one example with blank lines in it
    for block in doc.split("\n\n"):
        lines = block.splitlines()
        if all(_indent(line) >= 4 for line in lines):
            code.extend([*([""] if code else []), *(line[4:] for line in lines)])
            continue
        if code:
            out.append("```python\n" + "\n".join(code) + "\n```")
            code = []
        if lines[-1].endswith("::"):  # reStructuredText's "a code block follows"
            lines[-1] = lines[-1][:-1]
        if len(lines) > 1 and lines[0].endswith(":") and all(_indent(x) for x in lines[1:]):
            items: list[str] = []
            for line in lines[1:]:
                if _indent(line) <= 4 or not items:
                    items.append(f"- {line.strip()}")
                else:
                    items[-1] += f" {line.strip()}"
            out.append("\n".join([f"**{lines[0]}**", "", *items]))
        else:
            out.append("\n".join(lines))
    if code:
        out.append("```python\n" + "\n".join(code) + "\n```")
    return "\n\n".join(out)


def _docstring(owner: str, obj: Any) -> str:
    # Its own docstring only: getdoc() would hand a method without one its parent's.
    doc = inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""
    if not doc:
        raise SystemExit(f"{owner} has no docstring: document it before it is public")
    return _markdown(doc)


def _default(value: Any) -> str:
    # Functions and lambdas by name: their repr holds an address, different at every run.
    if callable(value) and hasattr(value, "__qualname__"):
        return value.__qualname__.replace(".<locals>", "")
    return repr(value)


def _signature(obj: Any, *, skip_self: bool = False) -> str:
    """``(a: int, *, b: str = 'x') -> bool``, annotations as written; one parameter per line
    when long. Empty when there is none to show (a Protocol, an exception's ``*args``)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    parts: list[str] = []
    previous = None
    for parameter in signature.parameters.values():
        if skip_self and parameter.name in ("self", "cls") and not parts:
            continue
        kind = parameter.kind
        if kind is parameter.KEYWORD_ONLY and previous not in (
            parameter.KEYWORD_ONLY,
            parameter.VAR_POSITIONAL,
        ):
            parts.append("*")
        if previous is parameter.POSITIONAL_ONLY and kind is not parameter.POSITIONAL_ONLY:
            parts.append("/")
        text = {parameter.VAR_POSITIONAL: "*", parameter.VAR_KEYWORD: "**"}.get(kind, "")
        text += parameter.name
        annotation = parameter.annotation  # a string under `from __future__ import annotations`
        if annotation is not parameter.empty:
            if not isinstance(annotation, str):
                annotation = inspect.formatannotation(annotation)
            text += f": {annotation}"
        if parameter.default is not parameter.empty:
            text += f" = {_default(parameter.default)}"
        parts.append(text)
        previous = kind
    if previous is inspect.Parameter.POSITIONAL_ONLY:
        parts.append("/")
    if parts == ["*args", "**kwargs"]:
        return ""
    returns = signature.return_annotation
    tail = "" if returns in (signature.empty, None, "None") else f" -> {returns}"
    one_line = f"({', '.join(parts)}){tail}"
    if len(one_line) <= 80:
        return one_line
    return "(\n" + "".join(f"    {part},\n" for part in parts) + f"){tail}"


def _entry(level: str, title: str, signature: str) -> Iterator[str]:
    """A heading, and the signature below it when there is one."""
    yield f"{level} `{title}`\n"
    if signature:
        yield f"```python\n{title.rsplit('.', 1)[-1]}{signature}\n```\n"


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties of ``cls`` and of its dynbatch base classes (``__call__``
    included), the class's own first."""
    seen: set[str] = set()
    own = [c for c in cls.__mro__ if c.__module__.startswith("dynbatch")]
    for name, member in ((n, m) for c in own for n, m in vars(c).items()):
        if (name.startswith("_") and name != "__call__") or name in seen:
            continue
        seen.add(name)
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isfunction(member) or isinstance(member, property):
            yield name, member


def _class(module: str, name: str, cls: type) -> Iterator[str]:
    plain = cls.__init__ is object.__init__ or issubclass(cls, BaseException)
    yield from _entry("###", f"{module}.{name}", "" if plain else _signature(cls))
    yield _docstring(f"{module}.{name}", cls) + "\n"
    if dataclasses.is_dataclass(cls):
        yield "Fields:\n"
        for field in dataclasses.fields(cls):
            yield f"- `{field.name}: {field.type}`"
        yield ""
    for member_name, member in _members(cls):
        owner = f"{module}.{name}.{member_name}"
        if isinstance(member, property):
            yield f"#### `{name}.{member_name}` (property)\n"
            yield _docstring(owner, member.fget) + "\n"
        else:
            yield from _entry("####", f"{name}.{member_name}", _signature(member, skip_self=True))
            yield _docstring(owner, member) + "\n"


def _module(module_name: str) -> Iterator[str]:
    module = importlib.import_module(module_name)
    yield f"## `{module_name}`\n"
    yield _docstring(module_name, module) + "\n"
    for name in module.__all__:
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if inspect.isclass(obj):
            yield from _class(module_name, name, obj)
        elif callable(obj):
            yield from _entry("###", f"{module_name}.{name}", _signature(obj))
            yield _docstring(f"{module_name}.{name}", obj) + "\n"


def render() -> str:
    lines = [HEADER]
    for module_name in MODULES:
        lines.extend(_module(module_name))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python docs/api_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
