"""The docs: every Python block of README.md and docs/*.md runs as written, top to bottom, one
namespace per page; the generated parts equal the code they come from; the README stays short and
its links resolve; `mkdocs build --strict` succeeds.

A Python block runs unless the line before it is a marker:

- `<!-- docs-test: cuda -->`: runs only where CUDA is available (`test_cuda_pages`);
- `<!-- docs-test: skip, <why> -->`: never runs (it reaches the hub, or starts processes on
  several machines); it must still compile.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers import retry_on_worker_abort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import generated  # noqa: E402  (docs/generated.py)

sys.path.remove(str(ROOT / "docs"))

FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^<!-- docs-test: (?P<what>cuda|skip, .+) -->$")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the block's first code line
    language: str
    code: str
    marker: str | None  # "cuda", "skip, <why>" or None

    def compiled(self):
        # padded with newlines so a traceback names the page and its line
        return compile("\n" * (self.line - 1) + self.code, str(ROOT / self.page), "exec")


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of `page` (relative to the repository root), with their markers."""
    lines = (ROOT / page).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        marker = MARKER.match(previous)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence) and not lines[j].strip(fence[0]))
        found.append(Block(page, i + 2, (info.split() or [""])[0].lower(), "\n".join(lines[i + 1:end]) + "\n",
                           marker["what"] if marker else None))
        i = end + 1
    return found


PAGES = [str(p.relative_to(ROOT)) for p in generated.pages()]
PYTHON = {page: [b for b in blocks(page) if b.language in ("python", "py")] for page in PAGES}
RUNNABLE = [page for page in PAGES if any(b.marker is None for b in PYTHON[page])]
WITH_CUDA = [page for page in PAGES if any(b.marker == "cuda" for b in PYTHON[page])]


def run_page(page: str, cuda: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the page's Python blocks top to bottom in one namespace, as a script would, in a
    fresh working directory (what the examples write lands there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__main__"}
    for block in PYTHON[page]:
        if block.marker is None or (cuda and block.marker == "cuda"):
            code = block.compiled()
            # a ddp_spawn worker may die of SIGABRT in torch's teardown on a loaded machine (see
            # retry_on_worker_abort): such a block runs once more; a block that starts no worker never does
            retry_on_worker_abort(lambda: exec(code, namespace))


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_runs(page, tmp_path, monkeypatch):
    run_page(page, False, tmp_path, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="these blocks need CUDA")
@pytest.mark.parametrize("page", WITH_CUDA or [pytest.param("-", marks=pytest.mark.skip("no page needs CUDA"))])
def test_cuda_pages(page, tmp_path, monkeypatch):
    run_page(page, True, tmp_path, monkeypatch)


def test_every_python_block_compiles_and_each_skip_says_why():
    for page in PAGES:
        for block in PYTHON[page]:
            block.compiled()
            if block.marker and block.marker.startswith("skip"):
                assert len(block.marker) > len("skip, ") + 10, f"{page}:{block.line}: say why the block is not run"
    markers = [(page, i + 1) for page in PAGES for i, line in enumerate((ROOT / page).read_text().splitlines())
               if line.startswith("<!-- docs-test") and not MARKER.match(line)]
    assert not markers, f"malformed docs-test markers at {markers}"


def test_generated_parts_equal_the_code():
    stale = []
    for page in PAGES:
        for name, body in generated.parts((ROOT / page).read_text()):
            assert name in generated.GENERATORS, f"{page}: unknown generated part {name!r}"
            if body != generated.GENERATORS[name]():
                stale.append(f"{page}: {name}")
    assert not stale, f"stale generated parts (run `python docs/generated.py`): {stale}"
    readme = dict(generated.parts((ROOT / "README.md").read_text()))
    assert "loop" in readme  # the README shows the loop, as the code writes it


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert targets and not missing, f"README links to missing files: {missing}"


_DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


@pytest.mark.skipif(any(importlib.util.find_spec(p.split(".")[0]) is None for p in _DOCS_PACKAGES),
                    reason="mkdocs build needs the docs extra: pip install -e '.[docs]'")
def test_mkdocs_build_strict(tmp_path, monkeypatch):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    monkeypatch.chdir(tmp_path)  # the config's paths are its own directory's, not the working one's
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
    config.plugins.on_startup(command="build", dirty=False)  # as `mkdocs build` does
    try:
        build(config)  # raises mkdocs.exceptions.Abort on any warning in strict mode
    finally:
        config.plugins.on_shutdown()
    assert (tmp_path / "site" / "reference" / "adapters" / "index.html").exists()


def test_every_module_has_a_reference_entry():
    from tests.test_architecture import modules

    directives = {line.split()[1] for page in (ROOT / "docs" / "reference").glob("*.md")
                  for line in page.read_text().splitlines() if line.startswith("::: ")}
    missing = sorted(set(modules()) - directives - {"nntrain", "nntrain.subscribers", "nntrain.__main__"})
    assert not missing, f"modules without a ::: entry in docs/reference/: {missing}"
