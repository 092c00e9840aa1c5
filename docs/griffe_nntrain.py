"""Griffe extension for the API reference (mkdocs.yml loads it), for two things of this project's
layout and house style that griffe does not read on its own:

- The Lightning bridge lives in the top-level folder `adapters/` but installs as `nntrain.adapters`
  (pyproject's package-dir), which griffe cannot see when it reads the source tree. When `nntrain`
  is loaded without an `adapters` member, `adapters/` is loaded and attached as `nntrain.adapters`,
  so `::: nntrain.adapters` works on a fresh clone as well as with the git-ignored
  `nntrain/adapters` symlink some checkouts have.
- A Google-style `Args:` entry may name several parameters that share one description
  (`init_scale, growth_factor: the GradScaler's.`); griffe would take that for one parameter
  missing from the signature. Such an entry is given to each parameter it names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters):\s*$")
_SHARED = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+)(\s*:\s.*)$")


def split_shared_args(text: str) -> str:
    """`text` with each `Args:` entry that names several parameters written once per parameter."""
    lines, out, i = text.splitlines(), [], 0
    section_indent: int | None = None
    while i < len(lines):
        line = lines[i]
        header = _SECTION.match(line)
        if header:
            section_indent = len(header[1])
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        if section_indent is not None and line.strip() and indent <= section_indent:
            section_indent = None  # the section ended
        shared = _SHARED.match(line) if section_indent is not None else None
        if not shared:
            out.append(line)
            i += 1
            continue
        more = []  # the entry's continuation lines
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > indent:
            more.append(lines[i])
            i += 1
        for name in re.split(r"\s*,\s*", shared[2]):
            out += [f"{shared[1]}{name}{shared[3]}", *more]
    return "\n".join(out)


def _objects(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class NntrainDocs(griffe.Extension):
    """Attach `adapters/` as `nntrain.adapters`; split shared `Args:` entries."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name == "nntrain" and "adapters" not in pkg.members:
            folder = Path(pkg.filepath).parent.parent / "adapters"  # nntrain/__init__.py -> <root>/adapters
            if (folder / "__init__.py").is_file():
                bridge = loader.load(folder)
                loader.modules_collection.del_member("adapters")  # known only as nntrain.adapters
                pkg.set_member("adapters", bridge)
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = split_shared_args(obj.docstring.value)
