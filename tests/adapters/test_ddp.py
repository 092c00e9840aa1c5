"""DDP on CPU (gloo, 2 processes via ddp_spawn): global metrics, same LR-finder decisions, weights come back."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torcheval.metrics import MulticlassAccuracy

from nntrain.learner import Learner, Subscriber
from nntrain.subscribers.lr_find import LRFindS
from nntrain.subscribers.metrics import MetricsS, batch_accuracy
from tests.helpers import retry_on_worker_abort, tiny_data, tiny_model

DDP = dict(engine="lightning", strategy="ddp_spawn", accelerator="cpu", devices=2)


class DumpRows(Subscriber):
    """Writes, per rank, the rows of a MetricsS (and an LRFindS record) to a JSON file."""

    order = 50

    def __init__(self, out_dir: str, metrics: MetricsS | None = None, finder: LRFindS | None = None):
        self.out_dir, self.metrics, self.finder = out_dir, metrics, finder

    def cleanup_fit(self, learn):
        rank = dist.get_rank() if dist.is_initialized() else 0
        data = {"rows": self.metrics.history if self.metrics else [],
                "lrs": self.finder.lrs if self.finder else [], "losses": self.finder.losses if self.finder else []}
        with open(os.path.join(self.out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(data, f)


def eval_dls(n=61, bs=8):
    # 61 samples: DistributedSampler pads to 62, rank 1's last sample repeats sample 0; 4 batches per rank
    valid = DataLoader(tiny_data(n, seed=3), batch_size=bs)
    return SimpleNamespace(train=DataLoader(tiny_data(16, seed=4), batch_size=bs), valid=valid)


def test_ddp_lr_finder_takes_the_same_decision_on_every_rank(tmp_path):
    finder = LRFindS(mult=1.5)
    dls = SimpleNamespace(train=DataLoader(tiny_data(256, seed=5), batch_size=8, shuffle=True),
                          valid=DataLoader(tiny_data(16, seed=6), batch_size=8))
    learn = Learner(tiny_model(), dls, F.cross_entropy, lr=1e-3, subs=[DumpRows(str(tmp_path), finder=finder)])
    retry_on_worker_abort(lambda: learn.fit(20, valid=False, lr=1e-3, subs=[finder], **DDP))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["lrs"]) > 3 and r0["lrs"] == r1["lrs"] and r0["losses"] == r1["losses"]
    assert finder.lrs == r0["lrs"] and finder.losses == r0["losses"]  # back in the caller's finder


def test_ddp_spawn_metrics_are_global_for_an_uneven_split_and_the_fit_comes_back(tmp_path):
    """One launch, two checks. The validation split (61 samples) is uneven over 2 ranks: the padded
    duplicate is not counted, so every rank's rows equal one process's evaluation of the same
    weights. And ddp_spawn brings back to the caller what a ddp run leaves on rank 0: weights,
    history, steps, epoch, the optimizer state."""
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    metrics = MetricsS(accuracy=MulticlassAccuracy(), top_is_right=batch_accuracy)
    learn = Learner(model, eval_dls(), F.cross_entropy, torch.optim.Adam, lr=0.05,
                    subs=[metrics, DumpRows(str(tmp_path), metrics)])
    retry_on_worker_abort(lambda: learn.fit(2, **DDP))
    assert learn.model is model
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # 16 training samples over 2 ranks, batch 8: one step per epoch
    assert learn.global_step == 2 and learn.epoch == 1
    assert [(r["epoch"], r["mode"]) for r in metrics.history] == [(0, "train"), (0, "valid"), (1, "train"),
                                                                  (1, "valid")]
    assert learn.opt.state_dict()["state"][0]["step"].item() == 2  # Adam's state came back too
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text())["rows"] for rank in (0, 1)]
    single = MetricsS(accuracy=MulticlassAccuracy(), top_is_right=batch_accuracy)
    single.output = lambda row: None
    Learner(model, eval_dls(), F.cross_entropy, subs=[single]).evaluate()  # the returned weights, 61 samples once
    expected = single.history[-1]
    for rank, rows in enumerate(ranks):
        assert rows == metrics.history, rank
        for key in ("loss", "accuracy", "top_is_right"):
            assert rows[-1][key] == pytest.approx(expected[key], abs=1e-6), (rank, key)
    assert 0.0 < expected["accuracy"] < 1.0  # a real, non-trivial value
