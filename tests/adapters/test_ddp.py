"""DDP on CPU (gloo): global metrics, same LR-finder decisions, the fit comes back from ddp_spawn
(2 processes), and one torchrun launch of two "nodes" on 127.0.0.1 running the scenarios of
`tests/adapters/ddp_nodes.py` (equal to devices=2, one-rank cancels, mid-epoch resume, diverged resume)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torcheval.metrics import MulticlassAccuracy

from nntrain.learner import Learner, Subscriber
from nntrain.subscribers.metrics import MetricsS, batch_accuracy
from tests.adapters.ddp_nodes import (
    CRASH_AT,
    recipe_learner,
    reference_dls,
    reference_learner,
    weights,
)
from tests.helpers import retry_on_worker_abort, tiny_model

DDP = dict(engine="lightning", strategy="ddp_spawn", accelerator="cpu", devices=2)


class DumpRows(Subscriber):
    """Writes, per rank, the rows of a MetricsS to a JSON file."""

    order = 50
    one_rank_cancels = False

    def __init__(self, out_dir: str, metrics: MetricsS):
        self.out_dir, self.metrics = out_dir, metrics

    def cleanup_fit(self, learn):
        rank = dist.get_rank() if dist.is_initialized() else 0
        data = {"rows": self.metrics.history}
        with open(os.path.join(self.out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(data, f)


def lightning_extras(out: Path) -> dict:
    """The Lightning callbacks and loggers users combine with DDP, for the ddp_spawn fit."""
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    return dict(callbacks=[ModelCheckpoint(dirpath=out / "mc", monitor="valid/loss", save_top_k=1, filename="best"),
                           EarlyStopping("valid/loss", patience=3), LearningRateMonitor(logging_interval="epoch")],
                logger=[CSVLogger(out, name="csv"), TensorBoardLogger(out, name="tb", default_hp_metric=False)])


@contextlib.contextmanager
def output_to(path: Path):
    """This process's stdout and stderr (and so the processes it starts) into `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


@pytest.fixture(scope="module")
def spawn_run(tmp_path_factory):
    """The reference fit of `ddp_nodes.py` under ddp_spawn with devices=2, with ModelCheckpoint,
    EarlyStopping, LearningRateMonitor, a CSVLogger and a TensorBoardLogger: the caller's learner
    and MetricsS afterwards, the initial weights, each rank's rows, and what the launch printed."""
    out = tmp_path_factory.mktemp("spawn")
    learn, metrics = reference_learner([])
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.add_subs([DumpRows(str(out), metrics)])
    with output_to(out / "printed.txt"):
        retry_on_worker_abort(lambda: learn.fit(2, **DDP, **lightning_extras(out)))
    ranks = [json.loads((out / f"rank{rank}.json").read_text())["rows"] for rank in (0, 1)]
    return SimpleNamespace(learn=learn, metrics=metrics, before=before, ranks=ranks, out=out,
                           printed=(out / "printed.txt").read_text())


def test_ddp_spawn_metrics_are_global_for_an_uneven_split_and_the_fit_comes_back(spawn_run):
    """The validation split (61 samples) is uneven over 2 ranks: the padded duplicate is not
    counted, so every rank's rows equal one process's evaluation of the same weights. And
    ddp_spawn brings back to the caller what a ddp run leaves on rank 0: weights, history,
    steps, epoch, the optimizer state."""
    learn, metrics = spawn_run.learn, spawn_run.metrics
    model = learn.model
    assert all(not torch.equal(a, b) for a, b in zip(spawn_run.before, model.parameters()))
    # 64 training samples over 2 ranks, batch 8: four steps per epoch
    assert learn.global_step == 8 and learn.epoch == 1
    assert [(r["epoch"], r["mode"]) for r in metrics.history] == [(0, "train"), (0, "valid"), (1, "train"),
                                                                  (1, "valid")]
    assert learn.opt.state_dict()["state"][0]["step"].item() == 8  # Adam's state came back too
    single = MetricsS(accuracy=MulticlassAccuracy(), top_is_right=batch_accuracy)
    single.output = lambda row: None
    Learner(model, reference_dls(), F.cross_entropy, subs=[single]).evaluate()  # the returned weights, 61 samples once
    expected = single.history[-1]
    for rank, rows in enumerate(spawn_run.ranks):
        assert rows == metrics.history, rank
        for key in ("loss", "accuracy", "top_is_right"):
            assert rows[-1][key] == pytest.approx(expected[key], abs=1e-6), (rank, key)
    assert 0.0 < expected["accuracy"] < 1.0  # a real, non-trivial value


def test_lightning_callbacks_and_loggers_under_ddp_spawn_get_the_native_numbers_quietly(spawn_run):
    """ModelCheckpoint, EarlyStopping, LearningRateMonitor, CSVLogger and TensorBoardLogger in the
    ddp_spawn fit (whose rows equal two torchrun nodes': `test_two_nodes_give_what_two_devices_give`)
    see the MetricsS values; the launch prints what one process prints (no info lines, no
    third-party deprecation) unless verbose=True."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nntrain.checkpoint_state import load_checkpoint

    out, valid = spawn_run.out, [row["loss"] for row in spawn_run.metrics.rows("valid")]
    rows = list(csv.DictReader(open(out / "csv" / "version_0" / "metrics.csv")))
    assert [float(r["valid/loss"]) for r in rows if r.get("valid/loss")] == pytest.approx(valid, abs=1e-6)
    assert [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")] == [0.05, 0.05]
    events = EventAccumulator(str(out / "tb" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("valid/loss")] == pytest.approx(valid, abs=1e-6)
    best = load_checkpoint(out / "mc" / "best.ckpt")
    (stopper,) = [v for k, v in best["callbacks"].items() if k.startswith("EarlyStopping")]
    assert float(stopper["best_score"]) == pytest.approx(min(valid), abs=1e-6)
    assert len(best["nntrain"]["ranks"]) == 2 and best["hyper_parameters"]["optimizer"] == "Adam"
    for noise in ("Initializing distributed", "distributed_backend", "LeafSpec", "GPU available"):
        assert noise not in spawn_run.printed, spawn_run.printed


def test_a_precision_plugin_and_on_exception_checkpoint_under_ddp(nodes_run):
    """Two processes (strategy="ddp", gloo): precision="bf16-mixed" gives MixedPrecisionS(bfloat16)'s
    rows and weights bitwise; an OnExceptionCheckpoint written when every rank failed before a
    training batch resumes to the uninterrupted run's rows and weights."""
    reference = nodes_run("reference", 0)
    for rank in (0, 1):
        run = nodes_run("precision", rank)
        assert run["plugin"] == run["subscriber"] and run["plugin"]["rows"] != reference["rows"]
        run = nodes_run("on_exception", rank)
        assert run["crash"] == "simulated crash" and run["position"] == [CRASH_AT[0], CRASH_AT[1] - 1]
        assert run["rows"] == reference["rows"] and run["weights"] == reference["weights"], rank


class SetEpoch(Subscriber):
    """Calls `sampler.set_epoch(epoch)` before each training pass, as Lightning does under DDP."""

    one_rank_cancels = False

    def __init__(self, sampler):
        self.sampler = sampler

    def before_epoch(self, learn):
        if learn.training:
            self.sampler.set_epoch(learn.epoch)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def nodes_run(tmp_path_factory):
    """One torchrun launch per "node" (2 nodes x 1 process on 127.0.0.1) of `ddp_nodes.py`; a
    hang is a failure: after 150 s both are killed. Returns `load(scenario, rank)`."""
    out = tmp_path_factory.mktemp("nodes")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "tests.adapters.ddp_nodes", str(out)],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for node in (0, 1)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=150)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the two-node DDP scenarios did not finish in 150 s (a rank hangs)")
    for node, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"node {node} failed:\n{log[-3000:]}"
    return lambda scenario, rank: json.loads((out / f"{scenario}-rank{rank}.json").read_text())


def test_two_nodes_give_what_two_devices_give(nodes_run, spawn_run):
    """num_nodes=2, devices=1 under torchrun: the same rows, weights and steps as devices=2."""
    for rank in (0, 1):
        run = nodes_run("reference", rank)
        assert run["rows"] == spawn_run.metrics.history, rank
        assert run["weights"] == weights(spawn_run.learn), rank
        assert run["global_step"] == 8


def test_a_cancel_on_one_rank_is_every_ranks_cancel(nodes_run):
    """CancelEpochException on rank 1 only (after training batch 1 of epoch 0), then
    CancelFitException on rank 0 only (before training batch 2 of epoch 1): no hang, and both
    ranks fire the same events, take the same steps and end with the same weights."""
    r0, r1 = nodes_run("cancels", 0), nodes_run("cancels", 1)
    assert r0["trace"] == r1["trace"] and r0["weights"] == r1["weights"]
    assert r0["global_step"] == r1["global_step"] == 4  # batches 0-1 of epoch 0, 0-1 of epoch 1
    train = [(e, i) for event, mode, e, i in map(tuple, r0["trace"]) if event == "before_batch" and mode == "train"]
    assert train == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    events = [event for event, *_ in r0["trace"]]
    assert "after_fit" not in events and events[-1] == "cleanup_fit"
    assert ("after_epoch", "train", 0, -1) not in map(tuple, r0["trace"])  # epoch 0's training pass cancelled
    assert ("after_epoch", "valid", 0, -1) in map(tuple, r0["trace"])  # its validation pass ran


def test_a_cancel_on_one_rank_in_trainer_validate_is_every_ranks_cancel(nodes_run):
    """`learn.evaluate(engine="lightning")` under DDP, CancelBatchException on rank 1 only before
    validation batch 1: both ranks skip that batch (same trace) and report the same values."""
    r0, r1 = nodes_run("validate", 0), nodes_run("validate", 1)
    assert r0["trace"] == r1["trace"] and r0["values"] == r1["values"] and r0["rows"] == r1["rows"]
    ends = [i for event, mode, _, i in r0["trace"] if event == "after_batch"]
    assert ends == [0, 2, 3] and "valid/loss" in r0["values"]


def test_a_mid_epoch_resume_gives_each_rank_its_own_state(nodes_run, spawn_run):
    """A crash inside epoch 1, resumed from the last mid-epoch checkpoint: every rank's partial
    epoch metrics come back, so the rows and weights equal the uninterrupted run's."""
    reference = nodes_run("reference", 0)
    for rank in (0, 1):
        run = nodes_run("resume", rank)
        assert run["crash"] == "simulated crash"
        assert run["resumed"] == f"ckpt-s0000000006-e{CRASH_AT[0]:06d}-b{CRASH_AT[1] - 1:07d}.ckpt"  # mid-epoch
        assert run["rows"] == reference["rows"], rank
        assert run["weights"] == reference["weights"], rank


def test_the_recipes_under_ddp_give_one_process_numbers_with_the_global_batch(nodes_run):
    """GradAccumS(2) + a per-step StepLR + EarlyStoppingS on 2 ranks of batch 8 give the rows and
    weights of one process with batch 32 over the same global order (Lightning's training
    `DistributedSampler` shuffles with seed 0 + epoch), and every rank stops after the same epoch."""
    from torch.utils.data import DataLoader, DistributedSampler

    learn, metrics = recipe_learner(batch_size=32, accumulate=1)
    data = learn.dls.train.dataset
    order = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)  # the ranks' global order
    learn.dls.train = DataLoader(data, batch_size=32, sampler=order)
    learn.fit(6, subs=[SetEpoch(order)])
    r0, r1 = nodes_run("recipes", 0), nodes_run("recipes", 1)
    assert r0 == r1
    assert len(r0["rows"]) == len(metrics.history) < 12  # stopped early, after the same epoch
    assert r0["global_step"] == learn.global_step == len(metrics.history)  # 2 steps per epoch, 2 rows
    for ddp_row, row in zip(r0["rows"], metrics.history):
        assert (ddp_row["epoch"], ddp_row["mode"]) == (row["epoch"], row["mode"])
        for key in ("loss", "accuracy"):
            assert ddp_row[key] == pytest.approx(row[key], abs=1e-5), (row, key)
    for ddp_w, w in zip(r0["weights"], weights(learn)):
        torch.testing.assert_close(torch.tensor(ddp_w), torch.tensor(w), rtol=1e-4, atol=1e-5)


def test_the_lr_finder_takes_the_same_decisions_on_every_rank(nodes_run):
    """The finder's stop depends on the loss averaged over the ranks: same records on both."""
    r0, r1 = nodes_run("lr_find", 0), nodes_run("lr_find", 1)
    assert len(r0["lrs"]) > 3 and r0 == r1


def test_ranks_that_would_resume_differently_refuse_together(nodes_run):
    """Each node resumes from a directory of its own, rank 1's empty, with resume="last" and with
    the file named: both ranks refuse before training (rank 1's missing file is raised with the
    others', not alone while they wait), naming what each found and the shared filesystem."""
    for rank in (0, 1):
        last, named = nodes_run("diverged", rank)["refused"]
        assert "rank 0: " in last and "ckpt-" in last and "rank 1: no checkpoint found for resume='last'" in last
        assert "rank 1: cannot resume" in named and "ckpt-s0000000004-e000000-end.ckpt" in named
        for refused in (last, named):
            assert "filesystem all nodes share" in refused


def test_a_sharding_strategy_gets_an_optimizer_like_the_learners_over_the_wrapped_parameters():
    """FSDP needs the optimizer over the wrapped module's parameters: `optimizer_over` makes one of
    the learner's class and hyper-parameters, and refuses what sharded parameters cannot take."""
    from functools import partial

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from nntrain.adapters.module import optimizer_over, shards_parameters
    from tests.helpers import BasicOptim

    assert shards_parameters(FSDPStrategy()) and not shards_parameters(DDPStrategy())
    model, wrapped = tiny_model(), tiny_model(seed=1)
    learn = Learner(model, reference_dls(), F.cross_entropy, partial(torch.optim.AdamW, betas=(0.8, 0.9),
                                                                      weight_decay=0.3), lr=0.02)
    learn.create_opt()
    opt = optimizer_over(learn.opt, wrapped.parameters())
    assert type(opt) is torch.optim.AdamW
    assert [p is q for p, q in zip(opt.param_groups[0]["params"], wrapped.parameters())] == [True] * 4
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.02, (0.8, 0.9), 0.3)
    learn.fit(1, valid=False)  # now the learner's optimizer holds state
    with pytest.raises(ValueError, match="cannot be carried over: resume from a Lightning checkpoint"):
        optimizer_over(learn.opt, wrapped.parameters())
    with pytest.raises(ValueError, match="hand-written optimizer .*BasicOptim"):
        optimizer_over(BasicOptim(model.parameters(), 0.1), wrapped.parameters())
    two = torch.optim.SGD([{"params": [model[0].weight]}, {"params": [model[0].bias]}], lr=0.1)
    with pytest.raises(ValueError, match="one parameter group; this optimizer has 2"):
        optimizer_over(two, wrapped.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Lightning's FSDP needs a GPU)")
def test_fsdp_on_cuda_trains_as_natively_and_gives_back_weights_and_optimizer_state():
    """strategy="fsdp" on one GPU: the optimizer is made over the wrapped parameters, the losses
    and weights match a native fit on the same GPU, and the learner gets the weights and Adam's state."""
    from nntrain.subscribers.device import DeviceS

    def run(**kw):
        learn, metrics = reference_learner([])
        learn.fit(2, **kw)
        return learn, metrics

    native, native_rows = run(subs=[DeviceS("cuda")])
    fsdp, fsdp_rows = run(engine="lightning", strategy="fsdp", accelerator="cuda", devices=1)
    for a, b in zip(native_rows.history, fsdp_rows.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
    for p, q in zip(native.model.parameters(), fsdp.model.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), rtol=1e-4, atol=1e-5)
    assert [s["step"].item() for s in fsdp.opt.state_dict()["state"].values()] == [16] * 4
