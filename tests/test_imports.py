"""`import nntrain` stays light: the heavy optional modules load only where they are used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("datasets", "pandas", "pyarrow", "PIL", "matplotlib", "torch.utils.tensorboard", "lightning", "sklearn")


def test_import_nntrain_loads_none_of_the_heavy_modules():
    code = f"import sys, nntrain; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
