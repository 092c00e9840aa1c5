"""The benchmarks' `--quick` runs: they finish and write well-formed output (no timing asserts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import data, throughput


@pytest.fixture(autouse=True)
def _keep_threads():
    """The scripts set torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def check_outputs(out: Path, name: str, expected: set[tuple[str, str]], numbers: list[str]) -> list[dict]:
    """The JSON lines, Markdown table and PNG that a run wrote to `out`; returns the rows."""
    rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
    assert {(r["workload"], r["loop"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for row in rows:
        for key in numbers:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (key, row)
        for key in ("device_name", "torch", "lightning", "date", "threads"):
            assert row[key], key

    md = (out / f"{name}.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(expected)  # header, separator, one line per row
    assert "torch.set_num_threads(1)" in md
    assert "Targets (target / measured / met)" in md

    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.width >= 400 and img.height >= 200
    return rows


def test_throughput_quick(quick_gpu_check):
    """`throughput --quick`, as the GPU check's dry run ran it (see conftest.py)."""
    expected = {(w, loop) for w in throughput.WORKLOADS for loop in throughput.LOOPS}
    written = check_outputs(quick_gpu_check.out, "throughput", expected,
                            ["samples_per_s", "us_per_step", "ratio_to_raw", "batch_size", "steps"])
    for row in written:
        assert row["us_per_step"] == pytest.approx(row["batch_size"] / row["samples_per_s"] * 1e6)
        assert isinstance(row["overhead_us_per_step"], float)
    printed = (quick_gpu_check.out / "throughput.log").read_text()  # the stage's own output
    assert "CPU tiny: learner+metrics over raw: <= +10 us/step / " in printed
    assert "CPU tiny: bridge over plain Lightning: <= +30 us/step / " in printed


def test_throughput_recipes_quick(tmp_path, capsys):
    rows = throughput.main(["--quick", "--recipes", "--device", "cpu", "--out", str(tmp_path)])
    written = check_outputs(tmp_path, "throughput_recipes", {("tiny", name) for name in throughput.RECIPES},
                            ["us_per_step", "us_per_opt_step", "time_ratio", "batch_size", "steps", "opt_steps"])
    assert [r["loop"] for r in rows] == [r["loop"] for r in written] == list(throughput.RECIPES)
    printed = capsys.readouterr().out
    for row in written:
        base = throughput.RECIPES[row["loop"]][0] or row["loop"]
        assert row["baseline"] == base
        for key in ("overhead_us_per_step", "cpu_overhead_us_per_step"):
            assert math.isfinite(row[key]), (key, row)
        if row["loop"] != base:
            assert f"CPU tiny: {row['loop']} over {base}: (reported) / " in printed
    by = {r["loop"]: r for r in written}
    assert by["learner"]["overhead_us_per_step"] == 0.0 and by["learner"]["time_ratio"] == 1.0
    assert by["GradAccumS(2)"]["opt_steps"] == (throughput.QUICK_STEPS + 1) // 2  # the last, short group steps too
    assert all(by[name]["opt_steps"] == throughput.QUICK_STEPS for name in by
               if name not in ("GradAccumS(2)", "MixedPrecisionS(fp16)"))  # the fp16 scaler may skip a step
    assert "GradScaler.step reads found_inf" in by["MixedPrecisionS(fp16)"]["note"]


def test_data_quick(quick_gpu_check):
    """`data --quick`, as the GPU check's dry run ran it (see conftest.py)."""
    rows = check_outputs(quick_gpu_check.out, "data", {(f"digits{data.SAMPLES_QUICK // 1000}k", loop) for loop in data.LOOPS},
                         ["samples_per_s", "us_per_batch", "ratio_to_per_item", "setup_s", "samples"])
    assert next(r for r in rows if r["loop"] == "per_item")["ratio_to_per_item"] == 1.0
    assert "batched vs per_item samples/s: >= 50x / " in (quick_gpu_check.out / "data.log").read_text()
