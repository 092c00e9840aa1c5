"""The parts of README.md and docs/*.md that are generated from the code, so each fact has one home.

A generated part sits between `<!-- generated: NAME -->` and `<!-- /generated: NAME -->`;
`tests/test_docs.py` checks each equals what `GENERATORS[NAME]()` gives. After changing the
code they come from, rewrite them in place:

    python docs/generated.py
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(\n<!-- /generated: (?P=name) -->)", re.S)


def loop() -> str:
    """The loop with every event in its place (`nntrain.events.loop_pseudocode`)."""
    from nntrain.events import loop_pseudocode

    return f"```text\n{loop_pseudocode()}\n```"


def events() -> str:
    """Every event, in the order a training batch meets them, with what holds when it fires."""
    from nntrain.events import EVENT_DOCS

    rows = [f"| `{event}` | {doc} |" for event, doc in EVENT_DOCS.items()]
    return "\n".join(["| event | when it fires, and what holds |", "|---|---|", *rows])


_FIELD = re.compile(r"^\s*self\.(\w+)(?::[^=]+)? = .*?  # (.+)$")
_GROUP = re.compile(r"^\s*# --- (.+?) -+$")


def learner_state() -> str:
    """The learner state as `Learner.__init__` declares it: each field and its comment, by group."""
    from nntrain.learner import Learner

    rows = ["| field | holds |", "|---|---|"]
    for line in inspect.getsource(Learner.__init__).splitlines():
        if group := _GROUP.match(line):
            rows.append(f"| *{group[1]}* | |")
        elif field := _FIELD.match(line):
            rows.append(f"| `{field[1]}` | {field[2].replace('|', '/')} |")
    return "\n".join(rows)


def hook_table() -> str:
    """The Lightning hooks and what each drives (`nntrain.adapters.hook_table_markdown`)."""
    from nntrain.adapters import hook_table_markdown

    return hook_table_markdown()


def cli_help() -> str:
    """`nntrain fit --help`, 100 columns wide."""
    from nntrain.cli import build_parser

    out = io.StringIO()
    with _columns(100), contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args(["fit", "--help"])
    return f"```text\n$ nntrain fit --help\n{out.getvalue().rstrip()}\n```"


@contextlib.contextmanager
def _columns(n: int):
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(n)
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


GENERATORS: dict[str, Callable[[], str]] = {
    "loop": loop,
    "events": events,
    "learner-state": learner_state,
    "hook-table": hook_table,
    "cli-help": cli_help,
}
"""Each generated part's name and the function that writes it."""


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def parts(text: str) -> list[tuple[str, str]]:
    """`(name, body)` of each generated part of a page's text."""
    return [(m["name"], m["body"]) for m in PART.finditer(text)]


def regenerate(text: str) -> str:
    """`text` with every generated part written anew."""
    return PART.sub(lambda m: m[1] + GENERATORS[m["name"]]() + m[4], text)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    for page in pages():
        text = page.read_text()
        new = regenerate(text)
        if new != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
