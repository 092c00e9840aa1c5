"""Progress bars, the epoch table and a loss plot: `ProgressS` (the views are `nntrain.display`'s).

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

import os
import time
from typing import TYPE_CHECKING, Any

import torch

from nntrain.checks import loader_length
from nntrain.display import (
    _HtmlBar,
    _NotebookView,
    _pick_display,
    _TerminalBar,
    _TerminalView,
    _TextView,
    figure_png,
    notebook_figure,
)
from nntrain.events import Subscriber, declared

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn: `import nntrain` stays fast
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ProgressS", "notebook_figure", "figure_png", "DISPLAYS"]

DISPLAYS = ("auto", "notebook", "terminal", "text")
"""The values of `ProgressS(display=...)`; "auto" picks one of the other three."""
# ----- the subscriber ----------------------------------------------------------------------------


class ProgressS(Subscriber):
    """An epochs bar over a batch bar, the metrics table, and optionally a loss plot.

    The batch bar shows the current loss at most every `refresh_every` seconds; the loss is read
    from the device only then, never on every batch, and never where no bar is shown. The
    values subscribers log (`learn.logs`: `MetricsS`'s) are shown here as the epoch's row (and
    kept in `rows`); `MetricsS` then prints none itself (`shows_rows`). Epochs are numbered
    from 0 in the bars and in the table.
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
        if learn.engine.rank == 0 and not getattr(learn.engine, "shows_progress", False):  # under DDP only
            # rank 0 shows bars, table and plot; an engine's own progress display (a Lightning bar) wins
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
        values = {name[len(prefix) :]: value for name, value in learn.logs.items() if name.startswith(prefix)}
        if values:
            self.write_row({"epoch": learn.epoch, "mode": learn.mode, **values})
        if learn.mode != "train" or not getattr(learn, "fit_valid", True):
            self._done = learn.epoch + 1
            if self._view is not None:
                self._view.end_epoch()

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
            parts = [
                f"{name} {losses[-1]:.4f}"
                for name, losses in (("train", self.train_losses), ("valid", self.valid_losses))
                if losses
            ]
            ax.figure.set_label(f"loss curves: {', '.join(parts) or 'no losses yet'}")
        if self.train_losses:
            ax.plot(self.train_steps, self.train_losses, label="train")
        if self.valid_losses:
            ax.plot(self.valid_steps, self.valid_losses, "o-", label="valid")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if self.train_losses or self.valid_losses:
            ax.legend(loc="best")
        return ax.figure  # type: ignore[return-value]  # a SubFigure when the `ax` given lies in one

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
        if self._stale and self._view is not None and self.train_losses:  # no curve from evaluation alone
            self._view.plot(self)
        self._stale = False

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close(self._seen)
            self._bar = None
