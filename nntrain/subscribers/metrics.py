"""Epoch metrics: `MetricsS`, the subscriber that runs `nntrain.metric_accumulation.MetricAccumulator`
over each pass and logs its row; `batch_accuracy` and `format_row`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from nntrain.events import Subscriber, declared
from nntrain.metric_accumulation import MetricAccumulator, is_rank_zero, real_samples

__all__ = ["MetricsS", "batch_accuracy", "format_row", "MetricAccumulator", "real_samples"]

Row = dict[str, Any]
"""One epoch's report: `epoch`, `mode` ('train' or 'valid'), `loss` and one float per metric."""


def batch_accuracy(preds: Tensor, targets: Tensor) -> Tensor:
    """Fraction of rows of `preds` whose argmax is the target class."""
    return (preds.argmax(dim=-1) == targets).float().mean()


def format_row(row: Row) -> str:
    """`row` as one line, floats to 4 decimals: `epoch 0 | train | loss 0.6931 | accuracy 0.5000`."""
    parts = [f"epoch {row['epoch']}", str(row["mode"])]
    for name, value in row.items():
        if name in ("epoch", "mode"):
            continue
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, list):
            value = "[" + ", ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in value) + "]"
        parts.append(f"{name} {value}")
    return " | ".join(parts)


class MetricsS(Subscriber):
    """Reports the weighted mean loss and `metrics` after each train and valid epoch.

    Each epoch's row (`{'epoch', 'mode', 'loss', <name>...}`) is appended to `history`, its
    values are logged as `<mode>/<name>` (`valid/loss`) through `learn.log` (so `learn.logs`,
    Lightning's `callback_metrics` and loggers, and what `learn.evaluate` returns have them),
    and the row goes to `output`, which prints it on rank 0 unless a subscriber that
    `shows_rows` (`ProgressS`) is attached or the engine `shows_progress` (a Lightning progress
    bar), or calls `sink(row)` when `sink` is set. See
    `MetricAccumulator` for the metrics accepted and `flush_every`.
    """

    reports = True  # lr_find detaches it during the search
    one_rank_cancels = False  # never cancels

    def __init__(self, *, flush_every: int = 256, max_buffered: int = 1 << 22, **metrics: Any) -> None:
        self.acc = MetricAccumulator(metrics, flush_every, max_buffered)
        self._real: int | None = None  # real samples of this rank's pass (None: the loader pads nothing)
        self._seen = 0
        self.history: list[Row] = []
        self.sink: Callable[[Row], None] | None = None  # where `output` sends rows instead of printing
        self._shown = False  # a subscriber that shows rows is attached

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics by name, as given."""
        return self.acc.metrics

    @property
    def last(self) -> Row | None:
        """The latest row, or None before the first epoch ends."""
        return self.history[-1] if self.history else None

    def rows(self, mode: str) -> list[Row]:
        """The rows of `history` whose mode is `mode` ('train', 'valid' or 'test')."""
        return [row for row in self.history if row["mode"] == mode]

    def before_fit(self, learn: Any) -> None:
        """Note whether another subscriber shows the rows (then `output` prints none)."""
        self._shown = any(declared(sub, "shows_rows") for sub in learn.subs) or bool(
            getattr(learn.engine, "shows_progress", False)
        )  # a Lightning progress bar shows the values

    def logged_names(self, learn: Any) -> list[str]:
        """The names this subscriber logs in `learn`'s fit (`train/loss`, `valid/<metric>`...)."""
        modes = ("train", "valid") if getattr(learn, "fit_valid", True) else ("train",)
        return [f"{mode}/{name}" for mode in modes for name in ("loss", *self.metrics)]

    def before_epoch(self, learn: Any) -> None:
        """Start the epoch's values from zero; note how many samples are real (not a
        `DistributedSampler`'s padding) when the loader pads."""
        self.acc.reset()
        self._real = real_samples(learn.dl)
        self._seen = 0

    def after_batch(self, learn: Any) -> None:
        """Buffer the batch's predictions, targets and loss (no sync). Under a padding
        `DistributedSampler`, the repeated samples at the end of this rank's pass are left out
        (the loss of a batch holding some is computed again on the real ones), so the values
        are those of one process over the dataset."""
        targets = learn.split_batch(learn.batch)[1]
        if self._real is None:
            self.acc.add(learn.preds, targets, learn.loss)
            return
        preds = learn.preds
        n = targets.shape[0]
        keep = min(max(self._real - self._seen, 0), n)
        self._seen += n
        if keep == n:
            self.acc.add(preds, targets, learn.loss)
        elif keep > 0:
            with torch.no_grad():
                self.acc.add(preds[:keep], targets[:keep], learn.loss_fn(preds[:keep], targets[:keep]))

    def after_epoch(self, learn: Any) -> None:
        """Compute the epoch's row, keep it in `history` and `output` it."""
        mode = learn.mode
        row: Row = {"epoch": learn.epoch, "mode": mode}
        row.update(self.acc.compute())
        self.history.append(row)
        learn.log(
            {
                f"{mode}/{name}": float(value)
                for name, value in row.items()
                if name not in ("epoch", "mode") and isinstance(value, (int, float))
            }
        )
        self.output(row)

    def cleanup_epoch(self, learn: Any) -> None:
        """Release the buffered batches (they are left over when the epoch was cancelled)."""
        self.acc.clear_buffer()

    def output(self, log: Row) -> None:
        """Send `log` to `sink` if set, else print it on rank 0 (unless a subscriber shows the rows)."""
        if self.sink is not None:
            self.sink(log)
        elif not self._shown and is_rank_zero():
            print(format_row(log))

    def state_dict(self) -> dict[str, Any]:
        """The history and the epoch in progress (see `MetricAccumulator.state_dict`), for checkpoints."""
        return {"history": [dict(row) for row in self.history], "epoch": self.acc.state_dict(), "seen": self._seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history (and the epoch in progress, when saved) from `state_dict`."""
        self.history = [dict(row) for row in state["history"]]
        if "epoch" in state:
            self.acc.load_state_dict(state["epoch"])
        self._seen = state.get("seen", 0)
