"""The Lightning pages of the docs: every Python block of `docs/coming-from-lightning.md` runs as
written, top to bottom, in one namespace (a block after `<!-- docs-test: skip, <why> -->` only
compiles); `docs/lightning-compat.md`'s counts add up to its rows."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n*```python\n(?P<code>.*?)\n```", re.S)


def test_coming_from_lightning_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = ROOT / "docs" / "coming-from-lightning.md"
    namespace = {"__name__": "__main__"}
    blocks = list(BLOCK.finditer(page.read_text()))
    assert len(blocks) >= 8
    for block in blocks:
        code = compile(block["code"], str(page), "exec")
        if "docs-test: skip" not in block["before"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exec(code, namespace)


def test_the_compatibility_matrix_counts_its_rows():
    text = (ROOT / "docs" / "lightning-compat.md").read_text()
    rows = [r for r in text.split("## Training", 1)[1].splitlines() if r.startswith("| ") and not r.startswith("| feature")]
    edge = [r for r in rows if "*(edge)*" in r]
    refused = sum("| refused" in r for r in rows)
    counts = re.search(r"\| all (\d+) rows of this page \| (\d+) \| (\d+) \| 0 \| 0 \| 0 \|", text)
    now = re.search(r"\| the (\d+) edge rows now \| (\d+) \| (\d+) \| 0 \| 0 \| 0 \|", text)
    assert counts and tuple(map(int, counts.groups())) == (len(rows), len(rows) - refused, refused)
    assert now and tuple(map(int, now.groups())) == (len(edge), len(edge) - sum("| refused" in r for r in edge),
                                                     sum("| refused" in r for r in edge))
    pytest.importorskip("lightning")
