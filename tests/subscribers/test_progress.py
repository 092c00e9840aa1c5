"""ProgressS: the display it picks (text, terminal, notebook), the epoch table, bars closed on every
path, no per-batch loss reads, the loss plot."""

from __future__ import annotations

import io
import sys
from types import ModuleType, SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
import torch.nn.functional as F

import nntrain.display as display_module
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


class TTY(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self):
        return True


def make_learner(subs=()):
    return Learner(tiny_model(), tiny_dls(shuffle=False), F.cross_entropy, torch.optim.SGD, 0.1, subs)


@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar ProgressS opens, each recording whether it was closed."""
    opened = []

    class RecordingBar(display_module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.position, self.was_closed = kwargs.get("position"), False
            opened.append(self)

        def close(self):
            self.was_closed = True
            super().close()

    monkeypatch.setattr(display_module, "tqdm", RecordingBar)
    return opened


def as_terminal(monkeypatch):
    """Replace stdout and stderr by streams that say they are terminals; returns them. Called in
    the test body: pytest sets its own capture streams again between a fixture and the test."""
    out, err = TTY(), TTY()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    return out, err


def test_order_is_after_metrics():
    assert ProgressS.order > MetricsS.order


def test_auto_picks_text_terminal_or_notebook(monkeypatch, capsys):
    assert progress_module._pick_display("auto") == "text"  # capsys: not a tty
    monkeypatch.setattr(sys, "stdout", TTY())
    assert progress_module._pick_display("auto") == "text"  # stderr is still captured
    monkeypatch.setattr(sys, "stderr", TTY())
    assert progress_module._pick_display("auto") == "terminal"
    fake_ipython = ModuleType("IPython")
    fake_ipython.get_ipython = lambda: SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    assert progress_module._pick_display("auto") == "notebook"
    assert progress_module._pick_display("text") == "text"
    with pytest.raises(ValueError, match="display must be one of"):
        ProgressS(display="widgets")


def test_without_a_terminal_prints_only_the_rows_and_a_final_line(capsys, bars):
    metrics, progress = MetricsS(accuracy=batch_accuracy), ProgressS()
    make_learner([metrics, progress]).fit(2)
    out, err = capsys.readouterr()
    assert "\r" not in out + err and err == "" and bars == []  # no progress frames at all
    lines = out.splitlines()
    assert len(lines) == 4  # header + one row per epoch (its passes side by side, as in a notebook) + the final line
    assert lines[0].split() == ["epoch", "train_loss", "valid_loss", "train_accuracy", "valid_accuracy", "time"]
    assert [line.split()[0] for line in lines[1:3]] == ["0", "1"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns
    assert all(len(cell.split(".")[1]) == 4 for line in lines[1:3] for cell in line.split()[1:5])  # 4 decimals
    assert lines[1].split()[2] == f"{progress.rows[1]['loss']:.4f}" and lines[1].split()[5].startswith("00:")
    assert lines[3].startswith("2/2 epochs in 00:")
    assert [(r["epoch"], r["mode"]) for r in progress.rows] == [(0, "train"), (0, "valid"), (1, "train"), (1, "valid")]
    assert metrics.sink is None  # given back after the fit


def test_a_terminal_shows_an_epochs_bar_over_batch_bars_numbered_like_the_table(monkeypatch, bars):
    out, err = as_terminal(monkeypatch)
    make_learner([MetricsS(accuracy=batch_accuracy), ProgressS(refresh_every=0.0)]).fit(2)
    epochs, *passes = bars
    assert (epochs.desc, epochs.total, epochs.position) == ("epochs", 2, 0)
    assert [bar.desc for bar in passes] == ["epoch 0 train", "epoch 0 valid", "epoch 1 train", "epoch 1 valid"]
    assert [bar.total for bar in passes] == [N_TRAIN_BATCHES, N_VALID_BATCHES] * 2
    assert all(bar.was_closed for bar in bars) and all(bar.position == 1 for bar in passes)
    assert "\r" in err.getvalue() and "loss=" in err.getvalue()  # frames, on the terminal only
    rows = [line.split()[0] for line in out.getvalue().splitlines()[1:3]]
    assert rows == ["0", "1"]  # one row per epoch
    assert out.getvalue().splitlines()[-1].startswith("2/2 epochs in ")


def test_works_without_metrics(capsys):
    progress = ProgressS(plot=True)
    make_learner([progress]).fit(1)
    assert capsys.readouterr().out.startswith("1/1 epochs in ") and progress.rows == []
    assert len(progress.valid_losses) == 1  # the mean of the detached valid losses


@pytest.mark.parametrize("exc", [CancelFitException(), RuntimeError("boom")], ids=["cancel", "error"])
def test_bars_closed_and_sink_restored_after_a_cancel_or_error(bars, capsys, exc):
    metrics, progress = MetricsS(accuracy=batch_accuracy), ProgressS(display="terminal")
    learn = make_learner([metrics, progress, CancelAt(2, exc)])
    if isinstance(exc, RuntimeError):
        with pytest.raises(RuntimeError, match="boom"):
            learn.fit(2)
    else:
        learn.fit(2)
    assert len(bars) == 2 and all(bar.was_closed for bar in bars) and bars[1].n == 3
    assert progress._bar is None and progress._view is None and metrics.sink is None
    assert capsys.readouterr().out.splitlines()[-1].startswith("0/2 epochs in ")


@pytest.mark.parametrize("plot", [False, True])
def test_reads_the_loss_only_when_a_refresh_is_due(monkeypatch, capsys, plot):
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

    learn.fit(2, subs=[ProgressS(plot=plot, refresh_every=1e9, display="terminal")])
    learn.fit(1, subs=[ProgressS(plot=plot, refresh_every=0.0, display="text")])  # no bar: nothing to show
    assert reads == []
    learn.fit(1, subs=[ProgressS(plot=plot, refresh_every=0.0, display="terminal")])  # the counter does see reads
    assert reads.count("__float__") == N_TRAIN_BATCHES + N_VALID_BATCHES


class FakeHandle:
    """An IPython DisplayHandle that keeps what it was shown, and counts its updates."""

    def __init__(self, bundle):
        self.bundle, self.updates = bundle, 0

    def update(self, bundle, raw=False):
        assert raw
        self.bundle, self.updates = bundle, self.updates + 1


def test_notebook_shows_bars_table_and_plot_each_updated_in_place(monkeypatch, capsys):
    display = pytest.importorskip("IPython.display")
    handles = []

    def fake_display(bundle, raw=False, display_id=False):
        assert raw and display_id
        handles.append(FakeHandle(bundle))
        return handles[-1]

    monkeypatch.setattr(display, "display", fake_display)
    progress = ProgressS(plot=True, refresh_every=0.0, display="notebook")
    make_learner([MetricsS(accuracy=batch_accuracy), progress]).fit(2)
    assert capsys.readouterr() == ("", "")  # nothing printed: all of it is in the three outputs
    bars, table, plot = handles
    assert all(h.updates > 1 for h in handles)
    assert bars.bundle["text/html"].count("<progress") == 2  # the epochs bar over the batch bar
    epochs_text, pass_text = bars.bundle["text/plain"].splitlines()  # the fallback shows the final state
    assert epochs_text.startswith("epochs: 100%") and "2/2" in epochs_text
    assert pass_text.startswith("epoch 1 valid: 100%") and "loss=" in pass_text
    header, *rows = table.bundle["text/plain"].splitlines()
    assert header.split() == ["epoch", "train_loss", "valid_loss", "train_accuracy", "valid_accuracy", "time"]
    assert [row.split()[0] for row in rows] == ["0", "1"]  # one row per epoch
    assert rows[1].split()[2] == f"{progress.valid_losses[1]:.4f}" and rows[1].split()[-1].startswith("00:")
    assert table.bundle["text/html"].count("<tr>") == 2 and "<th>time</th>" in table.bundle["text/html"]
    assert set(plot.bundle) == {"image/png", "text/plain"} and plot.bundle["text/plain"].startswith("<loss curves")


def test_evaluate_draws_no_loss_plot_of_one_dot(monkeypatch):
    display = pytest.importorskip("IPython.display")
    handles = []
    monkeypatch.setattr(display, "display", lambda bundle, raw=False, display_id=False:
                        handles.append(FakeHandle(bundle)) or handles[-1])
    progress = ProgressS(plot=True, display="notebook")
    make_learner([MetricsS(accuracy=batch_accuracy), progress]).evaluate()
    bars, table, plot = handles
    assert table.updates == 1 and plot.updates == 0 and plot.bundle == {"text/plain": ""}
    assert progress.valid_losses and not progress.train_losses
    ax = progress.plot_losses().axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["valid"]  # no empty "train" entry


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
    fig = progress.plot_losses()
    fig.draw_without_rendering()  # runs the layout, as a savefig or a notebook display does
    inside = fig.bbox.padded(1)  # tight layout: the axis labels are inside the figure, none clipped
    for label in (fig.axes[0].xaxis.label, fig.axes[0].yaxis.label):
        box = label.get_window_extent()
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1


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


@pytest.mark.parametrize("display", ["auto", "terminal", "notebook"])
def test_only_rank_zero_shows_anything(capsys, monkeypatch, display):
    """Under DDP every rank runs the subscribers; a non-zero rank shows no bar, table or plot."""
    from nntrain.engines import ENGINES, NativeEngine, register_engine

    class RankOne(NativeEngine):
        rank = 1

    monkeypatch.setattr(progress_module, "_NotebookView", None)  # would fail if it were made
    monkeypatch.setitem(ENGINES, "rank-one", RankOne)
    metrics, progress = MetricsS(accuracy=batch_accuracy), ProgressS(plot=True, display=display)
    learn = make_learner([metrics, progress])
    register_engine("rank-one", RankOne)
    learn.fit(1, engine="rank-one")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert [(r["epoch"], r["mode"]) for r in progress.rows] == [(0, "train"), (0, "valid")]  # kept, not shown
    assert len(progress.valid_losses) == 1
