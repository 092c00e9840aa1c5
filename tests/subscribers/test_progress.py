"""ProgressS: the epoch table, bars closed on every path, no per-batch loss reads, the loss plot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
import torch.nn.functional as F

import nntrain.subscribers.progress as progress_module
from nntrain.learner import CancelFitException, Learner, Subscriber
from nntrain.subscribers.metrics import MetricsS, batch_accuracy
from nntrain.subscribers.progress import ProgressS
from tests.helpers import tiny_dls, tiny_model

N_TRAIN_BATCHES, N_VALID_BATCHES = 6, 2  # tiny_dls: 96 and 32 samples in batches of 16


class CancelAt(Subscriber):
    """Raises `exc` after training batch `iter` of the first epoch, after ProgressS counted it."""

    order = 20

    def __init__(self, iter: int, exc: Exception) -> None:
        self.iter, self.exc = iter, exc

    def after_batch(self, learn):
        if learn.model.training and learn.iter == self.iter:
            raise self.exc


def make_learner(subs=()):
    return Learner(tiny_model(), tiny_dls(shuffle=False), F.cross_entropy, torch.optim.SGD, 0.1, subs)


@pytest.fixture
def bars(monkeypatch):
    """Every bar ProgressS opens, each recording whether it was closed."""
    opened = []

    class RecordingBar(progress_module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.was_closed = False
            opened.append(self)

        def close(self):
            self.was_closed = True
            super().close()

    monkeypatch.setattr(progress_module, "tqdm", RecordingBar)
    return opened


def test_order_is_after_metrics():
    assert ProgressS.order > MetricsS.order


def test_prints_the_metrics_table_once_aligned(capsys, bars):
    metrics, progress = MetricsS(accuracy=batch_accuracy), ProgressS()
    make_learner([metrics, progress]).fit(2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5  # header + 2 epochs x (train, valid)
    assert lines[0].split() == ["epoch", "mode", "loss", "accuracy"]
    assert [line.split()[:2] for line in lines[1:]] == [["0", "train"], ["0", "valid"], ["1", "train"], ["1", "valid"]]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert all(len(line.split()[2].split(".")[1]) == 4 for line in lines[1:])  # 4 decimals
    assert [(r["epoch"], r["mode"]) for r in progress.rows] == [(0, "train"), (0, "valid"), (1, "train"), (1, "valid")]
    assert metrics.sink is None  # given back after the fit
    assert [bar.total for bar in bars] == [N_TRAIN_BATCHES, N_VALID_BATCHES] * 2
    assert all(bar.was_closed for bar in bars)
    assert bars[0].desc.startswith("epoch 1/2 train") and bars[3].desc.startswith("epoch 2/2 valid")


def test_works_without_metrics(capsys, bars):
    progress = ProgressS(plot=True)
    make_learner([progress]).fit(1)
    assert capsys.readouterr().out == "" and progress.rows == []
    assert len(bars) == 2 and all(bar.was_closed for bar in bars)
    assert len(progress.valid_losses) == 1  # the mean of the detached valid losses


@pytest.mark.parametrize("exc", [CancelFitException(), RuntimeError("boom")], ids=["cancel", "error"])
def test_bars_closed_and_sink_restored_after_a_cancel_or_error(bars, exc):
    metrics, progress = MetricsS(accuracy=batch_accuracy), ProgressS()
    learn = make_learner([metrics, progress, CancelAt(2, exc)])
    if isinstance(exc, RuntimeError):
        with pytest.raises(RuntimeError, match="boom"):
            learn.fit(2)
    else:
        learn.fit(2)
    assert len(bars) == 1 and bars[0].was_closed and bars[0].n == 3
    assert progress._bar is None and metrics.sink is None


@pytest.mark.parametrize("plot", [False, True])
def test_reads_the_loss_only_when_a_refresh_is_due(monkeypatch, plot):
    learn = make_learner([MetricsS(accuracy=batch_accuracy)])
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            loss = getattr(learn, "loss", None)
            if loss is not None and self.data_ptr() == loss.data_ptr():
                reads.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "__float__", "tolist", "__format__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    learn.fit(2, subs=[ProgressS(plot=plot, refresh_every=1e9)])
    assert reads == []
    learn.fit(1, subs=[ProgressS(plot=plot, refresh_every=0.0)])  # the counter does see reads
    assert reads.count("__float__") == N_TRAIN_BATCHES + N_VALID_BATCHES


def test_plot_data_has_one_point_per_train_batch_and_per_epoch(tmp_path):
    metrics, progress = MetricsS(accuracy=batch_accuracy), ProgressS(plot=True)
    make_learner([metrics, progress]).fit(3)
    n = 3 * N_TRAIN_BATCHES
    assert len(progress.train_losses) == len(progress.train_steps) == n
    assert progress.train_steps == list(range(n))
    assert all(isinstance(x, float) for x in progress.train_losses)
    assert progress.valid_steps == [N_TRAIN_BATCHES, 2 * N_TRAIN_BATCHES, 3 * N_TRAIN_BATCHES]
    assert progress.valid_losses == [r["loss"] for r in progress.rows if r["mode"] == "valid"]

    path = tmp_path / "losses.png"
    progress.save_plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_no_plot_keeps_no_losses():
    progress = ProgressS()
    make_learner([progress]).fit(1)
    assert progress.train_losses == [] and progress.valid_losses == [] and progress._pending == []


def test_plot_data_on_the_lightning_engine():
    progress = ProgressS(plot=True)
    make_learner([MetricsS(accuracy=batch_accuracy), progress]).fit(
        2, engine="lightning", accelerator="cpu", enable_progress_bar=False, logger=False,
        enable_checkpointing=False, enable_model_summary=False,
    )
    assert progress.train_steps == list(range(2 * N_TRAIN_BATCHES))
    assert progress.valid_steps == [N_TRAIN_BATCHES, 2 * N_TRAIN_BATCHES] and len(progress.rows) == 4


def test_only_rank_zero_prints(capsys):
    """Under DDP every rank runs the subscribers; a non-zero rank shows no bar, table or plot."""
    from nntrain.learner import NativeEngine

    class RankOne(NativeEngine):
        rank = 1

    metrics, progress = MetricsS(accuracy=batch_accuracy), ProgressS()
    learn = make_learner([metrics, progress])
    learn.engine = RankOne()
    learn.fit(1)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert [(r["epoch"], r["mode"]) for r in progress.rows] == [(0, "train"), (0, "valid")]  # kept, not shown
