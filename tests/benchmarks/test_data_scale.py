"""`python -m benchmarks.data --part scale`: its generated sets and every method it measures
(in this process, on a few dozen images: the figures mean nothing, the code runs)."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks import data_scale


def test_every_method_runs_on_a_tiny_set_and_the_varied_set_loads_at_one_size(tmp_path):
    cpu = torch.device("cpu")
    path = data_scale.make_set(tmp_path, 70, 10, varied=False)
    assert (path / "done").exists() and data_scale.make_set(tmp_path, 70, 10, varied=False) == path  # made once
    for method in data_scale.METHODS:
        if method in data_scale.CACHED:
            data_scale.clear_caches(path)
        result = data_scale.measure(method, path, False, cpu)
        assert result["images"] == 70 and result["first_batch_s"] > 0 and np.isfinite(result["peak_rss_mb"]), method
    varied = data_scale.make_set(tmp_path, 70, 10, varied=True)
    assert data_scale.measure("nntrain-disk", varied, True, cpu)["images"] == 70
    assert data_scale.measure("float32-today", varied, True, cpu) == {"skipped": "refuses images of different sizes"}
