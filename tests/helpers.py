"""Shared test fixtures: a tiny dataset and model, and an event recorder."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nntrain.learner import EVENTS, Subscriber

BATCH_EVENTS = frozenset(
    ("before_batch", "after_predict", "after_loss", "before_backward", "after_backward", "before_step", "after_step",
     "after_batch", "cleanup_batch")
)


def tiny_data(n: int = 96, n_in: int = 8, n_out: int = 3, seed: int = 0) -> TensorDataset:
    """A linearly separable-ish classification set made from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    w = torch.randn(n_in, n_out, generator=g)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


def tiny_dls(n_train: int = 96, n_valid: int = 32, bs: int = 16, shuffle: bool = True, seed: int = 0,
             resumable: bool = False):
    """Train/valid loaders over `tiny_data`; shuffling draws from torch's global RNG. `resumable`:
    the train loader is a `ResumableDataLoader` (same batches, and it can continue an epoch)."""
    from nntrain.data import ResumableDataLoader

    train = (ResumableDataLoader if resumable else DataLoader)(tiny_data(n_train, seed=seed), batch_size=bs,
                                                               shuffle=shuffle)
    valid = DataLoader(tiny_data(n_valid, seed=seed + 1), batch_size=bs)
    return SimpleNamespace(train=train, valid=valid)


def tiny_model(n_in: int = 8, n_out: int = 3, seed: int = 0) -> nn.Module:
    """A 2-layer MLP with a fixed init."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, n_out))


class BasicOptim:
    """The second seed's hand-written optimizer: plain SGD with `lr`, `step` and `zero_grad` only."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def step(self, *args, **kwargs):
        for p in self.params:
            p.data -= p.grad.data * self.lr

    def zero_grad(self, *args, **kwargs):
        for p in self.params:
            p.grad = None


class Recorder(Subscriber):
    """Records every event as (event, mode, epoch, iter); mode is 'train' or 'valid'."""

    order = -100
    one_rank_cancels = False  # records, never cancels: no agreement between DDP ranks

    def __init__(self) -> None:
        self.trace: list[tuple[str, str, int, int]] = []
        self.losses: list[torch.Tensor] = []

    def _rec(self, learn, event: str) -> None:
        mode = "train" if learn.model.training else "valid"
        it = learn.iter if event in BATCH_EVENTS else -1
        self.trace.append((event, mode, getattr(learn, "epoch", -1), it))


def _make_handler(event: str):
    def handler(self, learn):
        self._rec(learn, event)
        if event == "after_loss" and learn.model.training:
            self.losses.append(learn.loss.detach().clone())
    handler.__name__ = event
    return handler


for _event in EVENTS:
    setattr(Recorder, _event, _make_handler(_event))


def retry_on_worker_abort(run: Callable[[], Any]) -> Any:
    """Run a multi-process test body (Lightning ddp_spawn workers), once more if a worker died of SIGABRT.

    On loaded 2-core machines a gloo worker sometimes aborts at interpreter exit ("terminate
    called without an active exception") after its work is done and its process group destroyed:
    a race in torch's teardown, not in the code under test. Any other failure, or a second abort,
    fails the test.
    """
    from torch.multiprocessing import ProcessExitedException

    try:
        return run()
    except ProcessExitedException as exc:
        if exc.signal_name != "SIGABRT":
            raise
        warnings.warn(f"a worker died of SIGABRT at exit ({exc}); running the test body once more")
        return run()
