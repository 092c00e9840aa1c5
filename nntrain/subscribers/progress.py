"""Progress bars, the epoch table and a loss plot: `ProgressS`; `notebook_figure` for every plot.

`ProgressS` shows its progress in one of three ways, picked at `before_fit`:

- a notebook (a Jupyter kernel): three outputs, each updated in place: the bars (an epochs bar
  over a batch bar), the table (one row per epoch: train and valid columns and the epoch's
  time, as fastai shows it) and the live loss plot. They are HTML with a text fallback that is
  updated with them, so a viewer without HTML or without the kernel sees the final state.
  No widgets are used, so `ipywidgets` is not needed.
- a terminal (stdout and stderr both ttys): tqdm bars on stderr, the rows printed above them.
- anything else (a file, a pipe, a captured stream): the rows and a final line, no bar frames.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from nntrain.checks import loader_length
from nntrain.events import Subscriber, declared

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn: `import nntrain` stays fast
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ProgressS", "notebook_figure", "figure_png", "DISPLAYS"]

DISPLAYS = ("auto", "notebook", "terminal", "text")
"""The values of `ProgressS(display=...)`; "auto" picks one of the other three."""


# ----- figures that a notebook shows once --------------------------------------------------------


def notebook_figure(figsize: tuple[float, float] = (6, 4)) -> Figure:
    """A new Figure, made outside pyplot, that a notebook shows once as a PNG without `%matplotlib`.

    Its layout is tight, so `fig.savefig(path)` clips no label. The text a notebook shows where
    it cannot show the image is the figure's label (`fig.set_label`).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="tight")
    # IPython looks `_repr_mimebundle_` up on the instance. Pyplot never holds this figure, so
    # `%matplotlib inline` does not show it a second time at the end of the cell.
    fig._repr_mimebundle_ = functools.partial(_figure_bundle, fig)  # type: ignore[attr-defined]
    return fig


def figure_png(fig: Figure) -> bytes:
    """`fig` as PNG bytes, cropped to what is drawn (`bbox_inches="tight"`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _figure_bundle(fig: Figure, include: Any = None, exclude: Any = None) -> dict[str, str]:
    return {"image/png": base64.b64encode(figure_png(fig)).decode("ascii"),
            "text/plain": f"<{fig.get_label() or 'figure'}>"}


# ----- which display -----------------------------------------------------------------------------


def _in_notebook() -> bool:
    """True inside a Jupyter kernel. IPython is not imported to find out: a kernel has done that."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _pick_display(display: str) -> str:
    if display != "auto":
        return display
    if _in_notebook():
        return "notebook"
    return "terminal" if _is_tty(sys.stdout) and _is_tty(sys.stderr) else "text"


def _cell(value: Any) -> str:
    """A table cell: floats to 4 decimals, anything else as `str`."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _final_line(done: int, total: int, seconds: float) -> str:
    return f"{done}/{total} epochs in {tqdm.format_interval(seconds)}"


# ----- the subscriber ----------------------------------------------------------------------------


class ProgressS(Subscriber):
    """An epochs bar over a batch bar, the metrics table, and optionally a loss plot.

    The batch bar shows the current loss at most every `refresh_every` seconds; the loss is read
    from the device only then, never on every batch, and never where no bar is shown. When a
    `MetricsS` is attached (`learn.metrics`), its rows are shown here (and kept in `rows`)
    instead of printed by MetricsS. Epochs are numbered from 0 in the bars and in the table.
    See the module docstring for what each `display` shows; under DDP only rank 0 shows
    anything, and every rank keeps `rows` and the plot data.

    With `plot=True` the detached loss of every batch is kept and copied to the host once per
    epoch into `train_losses` (per training batch, at `train_steps`) and `valid_losses` (per
    epoch, at `valid_steps`); x positions count the optimizer steps taken before the loss was
    measured. In a notebook the plot under the table is redrawn at each epoch's end; elsewhere
    call `plot_losses()` or `save_plot(path)` at any time.

    Raises:
        ValueError: `display` is not one of `DISPLAYS`.
    """

    reports = True  # lr_find detaches it during the search

    order = 10  # after MetricsS (order 0): the pass's values are logged when its after_epoch runs here
    shows_rows = True  # MetricsS prints no rows of its own while this shows them
    one_rank_cancels = False  # never cancels

    def __init__(self, plot: bool = False, refresh_every: float = 0.25, display: str = "auto") -> None:
        if display not in DISPLAYS:
            raise ValueError(f"display must be one of {DISPLAYS}, got {display!r}")
        self.plot = plot
        self.refresh_every = refresh_every
        self.display = display
        self.rows: list[dict[str, Any]] = []
        self.train_steps: list[int] = []
        self.train_losses: list[float] = []
        self.valid_steps: list[int] = []
        self.valid_losses: list[float] = []
        self._view: _TextView | _NotebookView | None = None  # None: nothing shown (rank > 0)
        self._bar: _TerminalBar | _HtmlBar | None = None  # the open pass's bar, if one is shown
        self._table = False  # a subscriber logs values: show them as a table
        self._pending: list[torch.Tensor] = []
        self._pending_steps: list[int] = []
        self._valid_row_loss: float | None = None
        self._next_refresh = 0.0
        self._seen = 0  # batches of the open pass
        self._stale = False  # plot data collected since the live plot was last drawn
        self._done = 0  # epochs finished (or skipped by a resume)
        self._n_epochs = 0
        self._epoch: int | None = None
        self._fit_start = self._epoch_start = 0.0

    # ----- events ----------------------------------------------------------------------------------

    def before_fit(self, learn: Any) -> None:
        """Reset the table and plot data and open the display (a table when a subscriber logs values)."""
        self.rows = []
        self.train_steps, self.train_losses, self.valid_steps, self.valid_losses = [], [], [], []
        self._table = any(declared(sub, "logged_names")(learn) for sub in learn.subs)
        self._n_epochs, self._done, self._epoch, self._stale = learn.n_epochs, 0, None, False
        self._fit_start = time.monotonic()
        self._view = None
        if learn.engine.rank == 0:  # under DDP only rank 0 shows bars, table and plot
            kind = _pick_display(self.display)
            if kind == "notebook":
                self._view = _NotebookView(self._n_epochs, table=self._table, plot=self.plot)
            else:
                self._view = _TerminalView(self._n_epochs) if kind == "terminal" else _TextView(self._n_epochs)

    def before_epoch(self, learn: Any) -> None:
        """Move the epochs bar on and open this pass's bar."""
        now = time.monotonic()
        if learn.epoch != self._epoch:
            self._epoch, self._epoch_start = learn.epoch, now
            self._done = max(self._done, learn.epoch)  # a resumed fit starts with its earlier epochs done
        self._seen = 0
        if self._view is not None:
            self._view.epochs(self._done)
            self._bar = self._view.open_pass(f"epoch {learn.epoch} {learn.mode}", loader_length(learn.dl))
        self._next_refresh = now + self.refresh_every

    def after_batch(self, learn: Any) -> None:
        """Count the batch; show the loss only when a refresh is due (that read syncs)."""
        self._seen += 1
        if self.plot:
            self._pending.append(learn.loss.detach())
            if learn.model.training:
                self._pending_steps.append(learn.global_step - 1)  # the step was taken on this loss
        if self._bar is not None:
            now = time.monotonic()
            if now >= self._next_refresh:
                self._next_refresh = now + self.refresh_every
                self._bar.show(self._seen, float(learn.loss.detach()))

    def after_epoch(self, learn: Any) -> None:
        """Show the pass's logged values as a row (`learn.logs`), and count the epoch as done
        after its last pass."""
        prefix = f"{learn.mode}/"
        values = {name[len(prefix):]: value for name, value in learn.logs.items() if name.startswith(prefix)}
        if values:
            self.write_row({"epoch": learn.epoch, "mode": learn.mode, **values})
        if learn.mode != "train" or not getattr(learn, "fit_valid", True):
            self._done = learn.epoch + 1

    def cleanup_epoch(self, learn: Any) -> None:
        """Close the pass's bar (also after a cancel or an error) and collect the epoch's plot data."""
        self._close_bar()
        if self.plot:
            self._collect(learn)
            if self._done > learn.epoch:  # the epoch's last pass: the live plot is redrawn once an epoch
                self._draw_plot()
        self._pending, self._pending_steps, self._valid_row_loss = [], [], None

    def cleanup_fit(self, learn: Any) -> None:
        """Close any open bar and show the final state."""
        self._close_bar()
        self._draw_plot()  # what a cancelled or failed epoch collected
        if self._view is not None:
            self._view.close(self._done, time.monotonic() - self._fit_start)
            self._view = None

    # ----- the table ---------------------------------------------------------------------------------

    def write_row(self, row: dict[str, Any]) -> None:
        """Keep a row of logged values (`{'epoch', 'mode', 'loss', ...}`) and show it."""
        self.rows.append(dict(row))
        if row.get("mode", "train") != "train" and "loss" in row:
            self._valid_row_loss = float(row["loss"])
        if self._view is not None:
            self._view.row(row, time.monotonic() - self._epoch_start)

    # ----- the plot ------------------------------------------------------------------------------------

    def plot_losses(self, ax: Axes | None = None) -> Figure:
        """Plot the training loss per batch and the validation loss per epoch against steps.

        Args:
            ax: axes to draw on; when None, a `notebook_figure` (shown once in a notebook).

        Returns:
            The figure drawn on.
        """
        if ax is None:
            ax = notebook_figure((6, 4)).add_subplot()
            parts = [f"{name} {losses[-1]:.4f}" for name, losses in
                     (("train", self.train_losses), ("valid", self.valid_losses)) if losses]
            ax.figure.set_label(f"loss curves: {', '.join(parts) or 'no losses yet'}")
        ax.plot(self.train_steps, self.train_losses, label="train")
        if self.valid_losses:
            ax.plot(self.valid_steps, self.valid_losses, "o-", label="valid")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if self.train_losses or self.valid_losses:
            ax.legend(loc="best")
        return ax.figure

    def save_plot(self, path: str | os.PathLike[str]) -> None:
        """Write `plot_losses()` to `path` as a PNG, nothing clipped."""
        self.plot_losses().savefig(path, format="png", bbox_inches="tight")

    def _collect(self, learn: Any) -> None:
        """Copy the pass's losses to the host (one sync)."""
        if learn.model.training:
            if not self._pending:
                return
            self.train_losses += torch.stack(self._pending).float().cpu().tolist()
            self.train_steps += self._pending_steps
        elif self._valid_row_loss is not None:
            self.valid_losses.append(self._valid_row_loss)
            self.valid_steps.append(learn.global_step)
        elif self._pending:
            self.valid_losses.append(torch.stack(self._pending).float().mean().item())
            self.valid_steps.append(learn.global_step)
        else:
            return  # the validation pass was skipped
        self._stale = True

    def _draw_plot(self) -> None:
        if self._stale and self._view is not None:
            self._view.plot(self)
        self._stale = False

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close(self._seen)
            self._bar = None


# ----- text and terminal -------------------------------------------------------------------------


class _TextView:
    """No terminal: each row as a line of an aligned table (header first), then a final line."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.columns: list[str] | None = None
        self.widths: list[int] = []

    def write(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)  # flushed: `tail -f` of a log sees each row

    def row(self, row: dict[str, Any], seconds: float) -> None:
        if self.columns is None:
            self.columns = list(row)
            self.widths = [max(len(str(c)), len(_cell(row[c])), 6) for c in self.columns]
            self.write(self._line(self.columns))
        self.write(self._line([_cell(row.get(c, "")) for c in self.columns]))

    def _line(self, cells: list[Any]) -> str:
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, self.widths))

    def epochs(self, done: int) -> None:
        pass

    def open_pass(self, desc: str, total: int | None) -> _TerminalBar | None:
        return None

    def plot(self, progress: ProgressS) -> None:
        pass

    def close(self, done: int, elapsed: float) -> None:
        self.write(_final_line(done, self.total, elapsed))


class _TerminalView(_TextView):
    """A terminal: an epochs bar over a batch bar (tqdm, on stderr), the rows printed above them."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.bar = tqdm(total=total, desc="epochs", position=0, leave=False, dynamic_ncols=True)

    def write(self, line: str) -> None:
        tqdm.write(line, file=sys.stdout)  # clears the bars, writes, draws them again

    def epochs(self, done: int) -> None:
        self.bar.update(done - self.bar.n)

    def open_pass(self, desc: str, total: int | None) -> _TerminalBar:
        return _TerminalBar(desc, total)

    def close(self, done: int, elapsed: float) -> None:
        self.bar.close()
        super().close(done, elapsed)


class _TerminalBar:
    """One pass's tqdm bar, moved on only when the subscriber refreshes it."""

    def __init__(self, desc: str, total: int | None) -> None:
        self.bar = tqdm(total=total, desc=desc, position=1, leave=False, dynamic_ncols=True)

    def show(self, n: int, loss: float) -> None:
        self.bar.set_postfix_str(f"loss={loss:.4f}", refresh=False)
        self.bar.update(n - self.bar.n)

    def close(self, n: int) -> None:
        self.bar.update(n - self.bar.n)
        self.bar.close()


# ----- the notebook ------------------------------------------------------------------------------


class _Meter:
    """What a bar shows: `desc`, `n` of `total` (None: unknown), the time since `start`, a postfix."""

    def __init__(self, desc: str, total: int | None) -> None:
        self.desc, self.total, self.n = desc, total, 0
        self.start, self.elapsed = time.monotonic(), 0.0
        self.postfix: str | None = None

    def move(self, n: int, postfix: str | None = None) -> None:
        self.n, self.elapsed = n, time.monotonic() - self.start
        self.postfix = postfix if postfix is not None else self.postfix

    def html(self) -> str:
        value = f' value="{self.n}" max="{self.total}"' if self.total else ""  # no total: indeterminate
        text = tqdm.format_meter(self.n, self.total, self.elapsed, ncols=0, prefix=self.desc, postfix=self.postfix)
        return (f'<div><progress{value} style="width:300px;height:1em;vertical-align:middle"></progress> '
                f'<span style="font-family:monospace">{html.escape(text)}</span></div>')

    def text(self) -> str:
        return tqdm.format_meter(self.n, self.total, self.elapsed, ncols=80, prefix=self.desc, postfix=self.postfix)


class _NotebookView:
    """Three notebook outputs updated in place: the bars, the table (one row per epoch), the plot."""

    def __init__(self, total: int, table: bool, plot: bool) -> None:
        from IPython.display import display

        self.epochs_meter = _Meter("epochs", total)
        self.pass_meter: _Meter | None = None
        self.columns: list[str] = []  # train_loss, valid_loss, train_accuracy, ...: modes side by side
        self.table_rows: dict[Any, dict[str, str]] = {}
        # Made now, in this order, so the table is under the bars and the plot under the table.
        self.bars = display(self._bars_bundle(), raw=True, display_id=True)
        self.table = display({"text/plain": ""}, raw=True, display_id=True) if table else None
        self.figure = display({"text/plain": ""}, raw=True, display_id=True) if plot else None

    def epochs(self, done: int) -> None:
        self.epochs_meter.move(done)
        self.draw_bars()

    def open_pass(self, desc: str, total: int | None) -> _HtmlBar:
        self.pass_meter = _Meter(desc, total)
        self.draw_bars()
        return _HtmlBar(self, self.pass_meter)

    def draw_bars(self) -> None:
        self.bars.update(self._bars_bundle(), raw=True)

    def _bars_bundle(self) -> dict[str, str]:
        meters = [m for m in (self.epochs_meter, self.pass_meter) if m is not None]
        return {"text/html": "".join(m.html() for m in meters), "text/plain": "\n".join(m.text() for m in meters)}

    def row(self, row: dict[str, Any], seconds: float) -> None:
        if self.table is None:
            return
        mode = row.get("mode", "train")
        cells = self.table_rows.setdefault(row.get("epoch"), {"epoch": str(row.get("epoch"))})
        for name, value in row.items():
            if name not in ("epoch", "mode"):
                self._add_column(f"{mode}_{name}", name)
                cells[f"{mode}_{name}"] = _cell(value)
        cells["time"] = tqdm.format_interval(seconds)
        self.table.update(self._table_bundle(), raw=True)

    def _add_column(self, column: str, name: str) -> None:
        if column not in self.columns:  # after the other modes' column of the same metric
            same = [i for i, c in enumerate(self.columns) if c.split("_", 1)[1] == name]
            self.columns.insert(same[-1] + 1 if same else len(self.columns), column)

    def _table_bundle(self) -> dict[str, str]:
        header = ["epoch", *self.columns, "time"]
        rows = [[cells.get(c, "") for c in header] for cells in self.table_rows.values()]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        widths = [max(len(c) for c in column) for column in zip(header, *rows)]
        text = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])
        return {"text/html": f'<table border="1" class="dataframe"><thead><tr style="text-align: left;">{head}'
                             f"</tr></thead><tbody>{body}</tbody></table>",
                "text/plain": text}

    def plot(self, progress: ProgressS) -> None:
        if self.figure is not None:
            self.figure.update(_figure_bundle(progress.plot_losses()), raw=True)

    def close(self, done: int, elapsed: float) -> None:
        self.epochs(done)


class _HtmlBar:
    """One pass's bar in the notebook view's bars output."""

    def __init__(self, view: _NotebookView, meter: _Meter) -> None:
        self.view, self.meter = view, meter

    def show(self, n: int, loss: float) -> None:
        self.meter.move(n, f"loss={loss:.4f}")
        self.view.draw_bars()

    def close(self, n: int) -> None:
        self.meter.move(n)
        self.view.draw_bars()
