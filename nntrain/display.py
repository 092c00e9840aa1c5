"""How progress is shown: the terminal, text and notebook views `ProgressS` draws through, their
bars and table, and `notebook_figure` / `figure_png` for every plot the library draws.

A notebook view is three outputs, each updated in place: the bars, the table and the live loss
plot, as HTML with a text fallback; no widgets are used, so `ipywidgets` is not needed. A
terminal view is tqdm bars on stderr with the rows printed above them; the text view (a file, a
pipe) prints the rows and a final line, no bar frames.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import sys
import time
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn: `import nntrain` stays fast
    from matplotlib.figure import Figure

__all__ = ["notebook_figure", "figure_png"]


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
    return {
        "image/png": base64.b64encode(figure_png(fig)).decode("ascii"),
        "text/plain": f"<{fig.get_label() or 'figure'}>",
    }


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


# ----- text and terminal -------------------------------------------------------------------------


def add_column(columns: list[str], column: str) -> None:
    """Add `column` ("valid_accuracy") to `columns` after the other modes' column of the same
    metric ("train_accuracy"), so the modes of one metric stand side by side, as fastai's table."""
    if column not in columns:
        name = column.split("_", 1)[1]
        same = [i for i, c in enumerate(columns) if c.split("_", 1)[1] == name]
        columns.insert(same[-1] + 1 if same else len(columns), column)


def epoch_cells(cells: dict[str, str], columns: list[str], row: dict[str, Any], seconds: float) -> None:
    """Merge one pass's `row` ({"epoch", "mode", "loss", ...}) into its epoch's `cells` as
    `<mode>_<name>` columns (added to `columns`), with the epoch's time so far."""
    mode = row.get("mode", "train")
    cells.setdefault("epoch", str(row.get("epoch")))
    for name, value in row.items():
        if name not in ("epoch", "mode"):
            add_column(columns, f"{mode}_{name}")
            cells[f"{mode}_{name}"] = _cell(value)
    cells["time"] = tqdm.format_interval(seconds)


class _TextView:
    """No terminal: one line per epoch of an aligned table (its passes side by side, and its time,
    as the notebook's table), printed when the epoch ends, the header first; then a final line."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.columns: list[str] = []
        self.header: list[str] | None = None  # fixed by the first epoch printed
        self.widths: list[int] = []
        self.cells: dict[str, str] = {}  # the running epoch's

    def write(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)  # flushed: `tail -f` of a log sees each row

    def row(self, row: dict[str, Any], seconds: float) -> None:
        if self.cells and self.cells.get("epoch") != str(row.get("epoch")):
            self.end_epoch()
        epoch_cells(self.cells, self.columns, row, seconds)

    def end_epoch(self) -> None:
        """Print the running epoch's line (the header before the first)."""
        if not self.cells:
            return
        if self.header is None:
            self.header = ["epoch", *self.columns, "time"]
            self.widths = [max(len(c), len(self.cells.get(c, "")), 6) for c in self.header]
            self.write(self._line(self.header))
        self.write(self._line([self.cells.get(c, "") for c in self.header]))
        self.cells = {}

    def _line(self, cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, self.widths))

    def epochs(self, done: int) -> None:
        pass

    def open_pass(self, desc: str, total: int | None) -> _TerminalBar | None:
        return None

    def plot(self, progress: Any) -> None:
        pass

    def close(self, done: int, elapsed: float) -> None:
        self.end_epoch()  # an epoch an interruption cut short shows what it logged
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
        return (
            f'<div><progress{value} style="width:300px;height:1em;vertical-align:middle"></progress> '
            f'<span style="font-family:monospace">{html.escape(text)}</span></div>'
        )

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
        epoch_cells(self.table_rows.setdefault(row.get("epoch"), {}), self.columns, row, seconds)
        self.table.update(self._table_bundle(), raw=True)

    def end_epoch(self) -> None:
        pass

    def _table_bundle(self) -> dict[str, str]:
        header = ["epoch", *self.columns, "time"]
        rows = [[cells.get(c, "") for c in header] for cells in self.table_rows.values()]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        widths = [max(len(c) for c in column) for column in zip(header, *rows)]
        text = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])
        return {
            "text/html": f'<table border="1" class="dataframe"><thead><tr style="text-align: left;">{head}'
            f"</tr></thead><tbody>{body}</tbody></table>",
            "text/plain": text,
        }

    def plot(self, progress: Any) -> None:
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
