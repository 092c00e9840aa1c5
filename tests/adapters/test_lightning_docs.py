"""`docs/lightning-compat.md`'s counts add up to its rows (its examples, and those of
`docs/coming-from-lightning.md`, run in tests/test_docs.py with every page's)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n*```python\n(?P<code>.*?)\n```", re.S)


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
