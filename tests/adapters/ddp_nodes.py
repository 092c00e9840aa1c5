"""The DDP scenarios of `test_ddp.py`'s two-"node" test, run in each process of one torchrun
launch (2 nodes x 1 process on 127.0.0.1, `strategy="ddp"`, `num_nodes=2`, `devices=1`).

Each process runs several fits in turn and writes what it saw to `<out>/<scenario>-rank<r>.json`:
- `reference`: the fit `test_ddp.py` also runs under `ddp_spawn` with `devices=2`;
- `cancels`: a `CancelEpochException` raised on rank 1 only, then a `CancelFitException` on
  rank 0 only: every rank must cancel at the same point;
- `validate`: `learn.evaluate` (`trainer.validate`) with a `CancelBatchException` on rank 1 only
  at validation batch 1: both ranks skip it;
- `resume`: the reference fit crashes inside epoch 1 and resumes from its last mid-epoch
  checkpoint (each rank's own partial-epoch metrics), and its rows must equal the reference's;
- `precision`: the reference fit with `MixedPrecisionS(torch.bfloat16)`, then with
  `precision="bf16-mixed"`: the same rows and weights;
- `on_exception`: the reference fit fails before training batch 2 of epoch 1 on every rank with
  an `OnExceptionCheckpoint`, and resumes from its file: the reference's rows and weights;
- `recipes`: `GradAccumS(2)`, a per-step `StepLR` through `SchedulerS` and `EarlyStoppingS`,
  batch 8 per rank: the numbers of one process with batch 32, the same stop on every rank;
- `lr_find`: `learn.lr_find` on a shuffled loader: every rank must take the same decisions;
- `diverged`: each node resumes from a checkpoint directory of its own (rank 1's is empty), with
  `resume="last"` and with the file rank 0 wrote named: both ranks must refuse before training.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch.utils.data import DataLoader
from torcheval.metrics import MulticlassAccuracy

from nntrain.checkpoint_state import latest_checkpoint
from nntrain.data import ResumableDataLoader
from nntrain.learner import (
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    Learner,
    Subscriber,
)
from nntrain.subscribers.checkpoint import CheckpointS
from nntrain.subscribers.gradients import GradAccumS
from nntrain.subscribers.metrics import MetricsS, batch_accuracy
from nntrain.subscribers.precision import MixedPrecisionS
from nntrain.subscribers.schedule import SchedulerS
from nntrain.subscribers.stopping import EarlyStoppingS
from tests.helpers import Recorder, tiny_data, tiny_model

NODES = dict(engine="lightning", strategy="ddp", accelerator="cpu", num_nodes=2, devices=1)
CRASH_AT = (1, 2)  # (epoch, training batch) where the `resume` scenario's first fit fails


def reference_dls() -> SimpleNamespace:
    """64 training samples (4 batches of 8 per rank), 61 validation samples (uneven over 2 ranks)."""
    return SimpleNamespace(train=ResumableDataLoader(tiny_data(64, seed=4), batch_size=8),
                           valid=DataLoader(tiny_data(61, seed=3), batch_size=8))


def no_output(row: dict) -> None:
    """A MetricsS output that prints nothing (module level: ddp_spawn pickles the learner)."""


def reference_learner(subs: list) -> tuple[Learner, MetricsS]:
    """The reference fit's learner (Adam, lr 0.05) with a MetricsS, and that MetricsS."""
    metrics = MetricsS(accuracy=MulticlassAccuracy(), top_is_right=batch_accuracy)
    metrics.output = no_output
    return Learner(tiny_model(), reference_dls(), F.cross_entropy, torch.optim.Adam, lr=0.05,
                   subs=[metrics, *subs]), metrics


def recipe_learner(batch_size: int, accumulate: int) -> tuple[Learner, MetricsS]:
    """The reference learner with `GradAccumS(accumulate)` (when > 1), a per-step StepLR and
    `EarlyStoppingS(patience=1)`, training on batches of `batch_size`."""
    subs = [SchedulerS(halve_every_step), EarlyStoppingS("valid/loss", patience=1)]
    if accumulate > 1:
        subs.append(GradAccumS(accumulate))
    learn, metrics = reference_learner(subs)
    learn.dls.train = DataLoader(tiny_data(64, seed=4), batch_size=batch_size)
    return learn, metrics


def halve_every_step(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    """A StepLR that multiplies the lr by 0.7 at every optimizer step."""
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)


def weights(learn: Learner) -> list:
    return [p.detach().tolist() for p in learn.model.parameters()]


class OneRankCancel(Subscriber):
    """Raises a cancel on one rank only: `CancelEpochException` on rank 1 after training batch 1
    of epoch 0, `CancelFitException` on rank 0 before training batch 2 of epoch 1."""

    def after_batch(self, learn):
        if learn.engine.rank == 1 and learn.training and (learn.epoch, learn.iter) == (0, 1):
            raise CancelEpochException("rank 1 only")

    def before_batch(self, learn):
        if learn.engine.rank == 0 and learn.training and (learn.epoch, learn.iter) == (1, 2):
            raise CancelFitException("rank 0 only")


class OneRankSkip(Subscriber):
    """Raises `CancelBatchException` on rank 1 only, before validation batch 1."""

    def before_batch(self, learn):
        if learn.engine.rank == 1 and not learn.training and learn.iter == 1:
            raise CancelBatchException("rank 1 only")


class Crash(Subscriber):
    """Fails the fit at `CRASH_AT`, on every rank (a node going down takes the job with it)."""

    one_rank_cancels = False

    def before_batch(self, learn):
        if learn.training and (learn.epoch, learn.iter) == CRASH_AT:
            raise RuntimeError("simulated crash")


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])

    def dump(name: str, data: dict) -> None:
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(data))

    learn, metrics = reference_learner([])
    learn.fit(2, **NODES)
    dump("reference", {"rows": metrics.history, "weights": weights(learn), "global_step": learn.global_step})

    recorder = Recorder()
    learn, metrics = reference_learner([recorder, OneRankCancel()])
    learn.fit(2, **NODES)
    dump("cancels", {"trace": recorder.trace, "weights": weights(learn), "global_step": learn.global_step})

    recorder = Recorder()
    learn, metrics = reference_learner([recorder, OneRankSkip()])
    values = learn.evaluate(engine="lightning", **{k: v for k, v in NODES.items() if k != "engine"})
    dump("validate", {"trace": recorder.trace, "values": values, "rows": metrics.history})

    shared = out / "ckpt"
    learn, metrics = reference_learner([CheckpointS(shared, every_batches=1, every_epochs=1), Crash()])
    try:
        learn.fit(2, **NODES)
    except RuntimeError as exc:
        crashed = str(exc)
    resumed = latest_checkpoint(shared)[0].name
    learn, metrics = reference_learner([CheckpointS(shared, every_batches=1, every_epochs=1)])
    learn.fit(2, resume="last", **NODES)
    dump("resume", {"crash": crashed, "resumed": resumed, "rows": metrics.history, "weights": weights(learn)})

    runs = {}
    for name, subs, options in (("subscriber", [MixedPrecisionS(torch.bfloat16)], {}),
                                ("plugin", [], {"precision": "bf16-mixed"})):
        learn, metrics = reference_learner(subs)
        learn.fit(2, **NODES, **options)
        runs[name] = {"rows": metrics.history, "weights": weights(learn)}
    dump("precision", runs)

    on_exception = OnExceptionCheckpoint(out / "on_exception")
    learn, metrics = reference_learner([Crash()])
    try:
        learn.fit(2, **NODES, callbacks=[on_exception])
    except RuntimeError as exc:
        crashed = str(exc)
    saved = torch.load(on_exception.ckpt_path, weights_only=True)["nntrain"]["position"]
    learn, metrics = reference_learner([])
    learn.fit(2, resume=on_exception.ckpt_path, **NODES)
    dump("on_exception", {"crash": crashed, "position": [saved["epoch"], saved["iter"]], "rows": metrics.history,
                          "weights": weights(learn)})

    learn, metrics = recipe_learner(batch_size=8, accumulate=2)
    learn.fit(6, **NODES)
    dump("recipes", {"rows": metrics.history, "weights": weights(learn), "global_step": learn.global_step})

    dls = SimpleNamespace(train=DataLoader(tiny_data(256, seed=5), batch_size=8, shuffle=True),
                          valid=DataLoader(tiny_data(16, seed=6), batch_size=8))
    finder = Learner(tiny_model(), dls, F.cross_entropy, lr=1e-3).lr_find(mult=1.5, max_epochs=20, **NODES)
    dump("lr_find", {"lrs": finder.lrs, "losses": finder.losses})

    own = out / f"node{rank}"  # a directory per node: rank 0 writes the files, so rank 1's stays empty
    learn, _ = reference_learner([CheckpointS(own, every_epochs=1)])
    learn.fit(1, **NODES)
    written = latest_checkpoint(out / "node0")[0].name
    refused = []
    for resume in ("last", own / written):  # rank 1 finds nothing, then cannot read the named file
        learn, _ = reference_learner([CheckpointS(own, every_epochs=1)])
        try:
            learn.fit(2, resume=resume, **NODES)
            refused.append("")
        except ValueError as exc:
            refused.append(str(exc))
    dump("diverged", {"refused": refused})


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter's teardown, where torch's gloo threads now and then abort
