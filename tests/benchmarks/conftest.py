"""One `--quick` run of the GPU check's CPU dry run, shared: it runs the throughput and data
benchmarks' quick modes too, so their tests read its output folder instead of running again."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="session")
def quick_gpu_check(tmp_path_factory) -> SimpleNamespace:
    """`gpu_check --device cpu --quick` once: its folder (`out`), what it printed, its return code."""
    from benchmarks import gpu_check

    out = tmp_path_factory.mktemp("gpu_check")
    printed = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(printed):
            rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the benchmarks set it; the rest of the session keeps its own
    return SimpleNamespace(out=out, printed=printed.getvalue(), rc=rc)
