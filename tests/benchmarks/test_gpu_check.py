"""The GPU check's CPU dry run (`--quick`): every stage runs and the folder holds what a GPU run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import data, gpu_check

STAGES = ["deps", "env", "nosync", "throughput", "cuda_tests", "fastpath", "data"]
TARGETS = ("fast path", "learner + MetricsS", "bridge vs plain Lightning", "host syncs per training batch")


@pytest.fixture(autouse=True)
def _keep_threads():
    """The benchmarks set torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_cpu_run_writes_env_summary_and_every_stages_output(quick_gpu_check):
    tmp_path, rc, printed = quick_gpu_check.out, quick_gpu_check.rc, quick_gpu_check.printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == STAGES
    errors = [s["error"] for s in stages.values()]
    assert {n: s["status"] for n, s in stages.items()} == dict.fromkeys(STAGES, "ok"), errors
    assert rc == 0 and summary["ok"] and summary["device"] == "cpu"
    assert stages["deps"]["result"]["installed"] == []  # nothing missing here: no wheel installed

    env = (tmp_path / "env.txt").read_text()
    for name in ("python:", "torch:", "lightning:", "torchmetrics:", "torcheval:", "device: cpu", "nvidia-smi"):
        assert name in env, name

    lines = [t["line"] for t in summary["targets"]]
    assert [t["name"].startswith(p) for t, p in zip(summary["targets"], TARGETS)] == [True] * 4
    assert all(t["met"] is None and line.endswith(" / n/a") for t, line in zip(summary["targets"], lines))
    md = (tmp_path / "summary.md").read_text()
    assert all(line in md and line in printed for line in lines)

    nosync = stages["nosync"]["result"]
    assert nosync["verdict"] == "n/a on cpu" and "n/a on cpu" in lines[3]
    assert nosync["epochs_ran"] == 3 and nosync["train_batches"] == gpu_check.NOSYNC_QUICK["batches"]
    assert [r["mode"] for r in nosync["last_rows"]] == ["train", "valid"]
    assert json.loads((tmp_path / "nosync.json").read_text())["verdict"] == "n/a on cpu"

    for name, workloads in (("throughput", {"tiny", "mlp", "cnn"}), ("data", {f"digits{data.SAMPLES_QUICK // 1000}k"}),
                            ("fastpath", {f"mlp-fastpath-b{gpu_check.FAST_BATCH}"})):
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert {r["workload"] for r in rows} == workloads, name
        assert (tmp_path / f"{name}.md").exists()
    assert "passed" in stages["cuda_tests"]["result"]["result"] or "skipped" in stages["cuda_tests"]["result"]["result"]
    assert "tests/subscribers/test_metrics.py" in stages["cuda_tests"]["result"]["files"]
    assert "tests/benchmarks/test_gpu_check.py" not in stages["cuda_tests"]["result"]["files"]
    assert stages["fastpath"]["result"]["with_metrics"]["ok"], stages["fastpath"]["result"]["with_metrics"]["error"]


def test_a_failing_stage_is_recorded_with_its_traceback(tmp_path):
    stage = gpu_check.Stage("broken")

    def body() -> dict:
        raise ValueError("no such device\nsecond line")

    gpu_check.run_stage(stage, body, tmp_path, 10)
    assert (stage.status, stage.error) == ("failed", "ValueError: no such device")
    assert "raise ValueError" in (tmp_path / "broken.traceback.txt").read_text()


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("good", [True, False])
def test_targets_on_cuda_are_judged_from_the_outputs(tmp_path, good):
    _jsonl(tmp_path / "throughput.jsonl", [
        dict(workload="mlp-fastpath", loop="fast", batch_size=1024, ratio_to_raw=3.4 if good else 2.0),
        dict(workload="mlp", loop="learner+metrics", ratio_to_raw=0.97 if good else 0.9),
        dict(workload="tiny", loop="bridge", us_per_step=400.0, over_lightning_us_per_step=-20.0 if good else 5.0),
        dict(workload="tiny", loop="lightning", us_per_step=420.0)])
    _jsonl(tmp_path / "fastpath.jsonl", [dict(workload="mlp-fastpath-b64", loop="fast", ratio_to_raw=5.0)])
    syncs = 0 if good else 3
    nosync = gpu_check.Stage("nosync", "ok", result=dict(
        train_batches=2048, warn=dict(syncs_in_batches=syncs, syncs_per_batch=syncs / 2048),
        error_mode=dict(passed=good)))
    found = gpu_check.targets(tmp_path, nosync, torch.device("cuda"))
    assert [t["met"] for t in found] == [good] * 4
    assert f"{3.4 if good else 2.0:.2f}x at batch 1024, 5.00x at batch 64 / " in found[0]["line"]
    assert found[3]["line"].endswith(f"mode 'error': {'passed' if good else 'raised'} / {'yes' if good else 'NO'}")
