"""Progress bars, the epoch table and a loss plot: `ProgressS`."""

from __future__ import annotations

import io
import os
import time
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from nntrain.learner import Subscriber, loader_length

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn: `import nntrain` stays fast
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ProgressS"]


def _in_notebook() -> bool:
    """True inside a Jupyter (IPython kernel) session."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _cell(value: Any) -> str:
    """A table cell: floats to 4 decimals, anything else as `str`."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class ProgressS(Subscriber):
    """A tqdm bar per epoch, the metrics table printed above the bars, and optionally a loss plot.

    The bar shows the current loss at most every `refresh_every` seconds; the loss is read from
    the device only then, never on every batch. When a `MetricsS` is attached (`learn.metrics`),
    its rows are printed here as an aligned table (and kept in `rows`) instead of by MetricsS.

    With `plot=True` the detached loss of every batch is kept and copied to the host once per
    epoch into `train_losses` (per training batch, at `train_steps`) and `valid_losses` (per
    epoch, at `valid_steps`); x positions count the optimizer steps taken before the loss was
    measured. In a notebook the plot is redrawn at each epoch's end; elsewhere call
    `plot_losses()` or `save_plot(path)` at any time.
    """

    reports = True  # lr_find detaches it during the search

    order = 10  # after MetricsS (order 0), so its rows for an epoch arrive before that epoch ends here

    def __init__(self, plot: bool = False, refresh_every: float = 0.25) -> None:
        self.plot = plot
        self.refresh_every = refresh_every
        self.rows: list[dict[str, Any]] = []
        self.train_steps: list[int] = []
        self.train_losses: list[float] = []
        self.valid_steps: list[int] = []
        self.valid_losses: list[float] = []
        self._bar: Any = None
        self._columns: list[str] | None = None
        self._widths: list[int] = []
        self._hooked: tuple[Any, Any] | None = None  # (the MetricsS we print for, its previous sink)
        self._pending: list[torch.Tensor] = []
        self._pending_steps: list[int] = []
        self._valid_row_loss: float | None = None
        self._next_refresh = 0.0
        self._notebook = False
        self._quiet = False
        self._display: Any = None

    # ----- events ----------------------------------------------------------------------------------

    def before_fit(self, learn: Any) -> None:
        """Reset the table and plot data and take over the printing of `learn.metrics`."""
        self.rows, self._columns = [], None
        self._quiet = learn.engine.rank != 0  # under DDP only rank 0 shows bars, table and plot
        self.train_steps, self.train_losses, self.valid_steps, self.valid_losses = [], [], [], []
        self._notebook, self._display = _in_notebook(), None
        metrics = getattr(learn, "metrics", None)
        if metrics is not None and hasattr(metrics, "sink"):
            self._hooked = (metrics, metrics.sink)
            metrics.sink = self.write_row

    def before_epoch(self, learn: Any) -> None:
        """Open this epoch's bar."""
        dl = learn.dl
        mode = learn.mode
        self._bar = tqdm(
            total=loader_length(dl),
            desc=f"epoch {learn.epoch + 1}/{learn.n_epochs} {mode}",
            leave=False,
            dynamic_ncols=True,
            disable=self._quiet,
        )
        self._next_refresh = time.monotonic() + self.refresh_every

    def after_batch(self, learn: Any) -> None:
        """Advance the bar; show the loss only when a refresh is due (that read syncs)."""
        self._bar.update(1)
        if self.plot:
            self._pending.append(learn.loss.detach())
            if learn.model.training:
                self._pending_steps.append(learn.global_step - 1)  # the step was taken on this loss
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + self.refresh_every
            self._bar.set_postfix(loss=f"{float(learn.loss.detach()):.4f}")

    def cleanup_epoch(self, learn: Any) -> None:
        """Close the bar (also after a cancel or an error) and collect the epoch's plot data."""
        self._close_bar()
        if self.plot:
            self._collect(learn)
        self._pending, self._pending_steps, self._valid_row_loss = [], [], None

    def cleanup_fit(self, learn: Any) -> None:
        """Close any open bar and give `learn.metrics` its own sink back."""
        self._close_bar()
        if self._hooked is not None:
            metrics, sink = self._hooked
            metrics.sink = sink
            self._hooked = None

    # ----- the table ---------------------------------------------------------------------------------

    def write_row(self, row: dict[str, Any]) -> None:
        """Print a metrics row under the table header (printed once), without breaking the bars."""
        self.rows.append(dict(row))
        if row.get("mode", "train") != "train" and "loss" in row:
            self._valid_row_loss = float(row["loss"])
        if self._quiet:
            return
        if self._columns is None:
            self._columns = list(row)
            self._widths = [max(len(str(c)), len(_cell(row[c])), 6) for c in self._columns]
            tqdm.write(self._line(self._columns))
        tqdm.write(self._line([_cell(row.get(c, "")) for c in self._columns]))

    def _line(self, cells: list[Any]) -> str:
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, self._widths))

    # ----- the plot ------------------------------------------------------------------------------------

    def plot_losses(self, ax: Axes | None = None) -> Figure:
        """Plot the training loss per batch and the validation loss per epoch against steps.

        Args:
            ax: axes to draw on; a new figure (outside pyplot) is made when None.

        Returns:
            The figure drawn on.
        """
        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(6, 4)).add_subplot()
        ax.plot(self.train_steps, self.train_losses, label="train")
        if self.valid_losses:
            ax.plot(self.valid_steps, self.valid_losses, "o-", label="valid")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(loc="best")
        return ax.figure

    def save_plot(self, path: str | os.PathLike[str]) -> None:
        """Write `plot_losses()` to `path` as a PNG."""
        self.plot_losses().savefig(path, format="png")

    def _collect(self, learn: Any) -> None:
        """Copy the epoch's losses to the host (one sync) and redraw the live plot."""
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
        if self._notebook and not self._quiet:
            self._show()

    def _show(self) -> None:
        """Show the plot in the notebook, replacing the previous drawing."""
        from IPython.display import Image, display

        buf = io.BytesIO()
        self.plot_losses().savefig(buf, format="png")
        image = Image(data=buf.getvalue())
        if self._display is None:
            self._display = display(image, display_id=True)
        else:
            self._display.update(image)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
