"""In a Jupyter notebook (a real kernel, run by nbclient): every plot shows once as a PNG without
`%matplotlib`, `learn.lr_find()` shows its plot and its suggestions by itself, and ProgressS shows
its bars, one table and the live plot, each updated in place."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel (pip install -e '.[test]')")
nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]

CELLS = [
    f"""import sys; sys.path.insert(0, {str(ROOT)!r})
import torch, torch.nn.functional as F
from nntrain import Learner, MetricsS, ProgressS
from nntrain.subscribers.metrics import batch_accuracy
from tests.helpers import tiny_dls, tiny_model
learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, torch.optim.SGD, 0.1,
                subs=[MetricsS(accuracy=batch_accuracy), ProgressS(plot=True)])""",
    "learn.lr_find(start_lr=1e-4)",  # the result shows itself: its plot, its suggestions as text
    "lrf = learn.lr_find(start_lr=1e-4)\nlrf.plot()",
    "learn.fit_one_cycle(2, lr_max=0.2)",
    "learn.scheduler.plot()",
    "%matplotlib inline\nimport matplotlib.pyplot as plt\nlrf.plot()",  # pyplot's inline display adds no copy
    "learn.fit(1, engine='lightning')",  # the same displays; no Out[] Trainer, no warnings
]
SETUP, LR_FIND, LR_PLOT, FIT, SCHEDULE_PLOT, INLINE_LR_PLOT, LIGHTNING_FIT = range(len(CELLS))


class RecordingClient(nbclient.NotebookClient):
    """Records (cell index, message type, display id) of every output message the kernel sends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages: list[tuple[int, str, str | None]] = []

    def process_message(self, msg, cell, cell_index):
        transient = msg["content"].get("transient") or {}
        self.messages.append((cell_index, msg["msg_type"], transient.get("display_id")))
        return super().process_message(msg, cell, cell_index)


@pytest.fixture(scope="module")
def executed():
    """The notebook run once on a fresh kernel: (notebook, recorded messages)."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in CELLS])
    client = RecordingClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    return nb, client.messages


def outputs(executed, cell):
    return executed[0].cells[cell].outputs


def test_plots_show_once_as_png_without_matplotlib_magic(executed):
    for cell in (LR_PLOT, SCHEDULE_PLOT, INLINE_LR_PLOT):
        (out,) = outputs(executed, cell)  # exactly one output: the returned Figure, shown once
        assert out.output_type == "execute_result" and "image/png" in out.data, cell
    assert outputs(executed, LR_PLOT)[0].data["text/plain"].startswith("<LR finder: ")
    assert outputs(executed, SCHEDULE_PLOT)[0].data["text/plain"].startswith("<lr schedule: ")


def test_lr_find_shows_its_plot_and_its_suggestions(executed):
    (out,) = outputs(executed, LR_FIND)  # one output: the result, as a picture with its text
    assert out.output_type == "execute_result" and "image/png" in out.data
    text = out.data["text/plain"]
    assert text.startswith("SuggestedLRs(valley=") and all(f"{m}=" in text for m in ("steepest", "minimum", "slide"))


def test_nothing_shows_as_figure_text_or_terminal_frames(executed):
    for cell in executed[0].cells:
        for out in cell.outputs:
            texts = [out.get("text", ""), *(v for k, v in out.get("data", {}).items() if k.startswith("text/"))]
            assert not any("<Figure size" in t or "\r" in t for t in texts), out
            assert out.output_type != "stream", out  # no rows or warnings printed around the displays


def test_a_lightning_fit_shows_the_same_displays_and_no_trainer(executed):
    shown = outputs(executed, LIGHTNING_FIT)
    assert [out.output_type for out in shown] == ["display_data"] * 3  # bars, table, plot; no Out[]
    assert shown[1].data["text/html"].count("<tr>") == 1


def test_fit_shows_bars_then_one_table_then_the_live_plot_each_updated_in_place(executed):
    bars, table, plot = outputs(executed, FIT)
    assert [out.output_type for out in (bars, table, plot)] == ["display_data"] * 3
    assert bars.data["text/html"].count("<progress") == 2  # the epochs bar over the batch bar
    epochs_line, pass_line = bars.data["text/plain"].splitlines()  # the text fallback: the final state
    assert epochs_line.startswith("epochs: 100%") and "2/2" in epochs_line
    assert pass_line.startswith("epoch 1 valid: 100%")
    html = table.data["text/html"]
    assert html.startswith("<table") and html.count("<tr>") == 2  # one row per epoch
    for column in ("epoch", "train_loss", "valid_loss", "valid_accuracy", "time"):
        assert f"<th>{column}</th>" in html
    assert table.data["text/plain"].splitlines()[0].split()[0] == "epoch"
    assert "image/png" in plot.data
    fit_messages = [(kind, display_id) for cell, kind, display_id in executed[1] if cell == FIT]
    shown = [display_id for kind, display_id in fit_messages if kind == "display_data"]
    updates = Counter(display_id for kind, display_id in fit_messages if kind == "update_display_data")
    assert len(shown) == 3 and all(display_id is not None and updates[display_id] >= 2 for display_id in shown)
