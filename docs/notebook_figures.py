"""Run docs/notebook_example.ipynb on a fresh kernel (outputs saved in place), then draw
docs/notebook_table.png from what its fit cell shows: the epochs bar over the batch bar and the
epoch table, as a notebook renders them (read from the outputs' text fallbacks).

    python docs/notebook_figures.py        # needs nbclient and ipykernel (pip install -e ".[test]")
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import nbformat  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

DOCS = Path(__file__).resolve().parent
NOTEBOOK, PNG = DOCS / "notebook_example.ipynb", DOCS / "notebook_table.png"

nb = nbformat.read(NOTEBOOK, as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(DOCS.parent)}}).execute()
for cell in nb.cells:  # keep the saved notebook free of run-specific metadata
    cell.metadata.pop("execution", None)
nbformat.write(nb, NOTEBOOK)

fit = next(cell for cell in nb.cells if "fit_one_cycle" in cell.source)
bars, table = (out.data["text/plain"] for out in fit.outputs if "text/html" in out.data)
bar_lines = bars.splitlines()
header, *rows = [line.split() for line in table.splitlines()]

LINE = 0.3  # inches per line of text
n_lines = len(bar_lines) + 0.5 + len(rows) + 1
fig = Figure(figsize=(7.2, LINE * n_lines), dpi=110)
ax = fig.add_axes((0, 0, 1, 1), xlim=(0, 1), ylim=(n_lines, 0))  # y counts lines from the top
ax.set_axis_off()
for i, line in enumerate(bar_lines):  # "epochs: 100%|████| 5/5 [00:04<00:00]": the bar drawn, the rest as text
    label, _, rest = line.partition("|")
    fraction = float(label.rsplit(None, 1)[-1].rstrip("%")) / 100
    counts = rest.partition("|")[2].strip()
    y = i + 0.5
    ax.add_patch(Rectangle((0.02, y - 0.3), 0.3, 0.6, facecolor="#e6e6e6", edgecolor="#bbbbbb"))
    ax.add_patch(Rectangle((0.02, y - 0.3), 0.3 * fraction, 0.6, facecolor="#2e7d32"))
    ax.text(0.34, y, f"{label.strip()} {counts}", va="center", family="monospace", fontsize=8)
top = len(bar_lines) + 0.5
drawn = ax.table(cellText=rows, colLabels=header, cellLoc="right", colLoc="right", edges="horizontal",
                 bbox=(0.02, 1 - (top + len(rows) + 1) / n_lines, 0.96, (len(rows) + 1) / n_lines))
drawn.auto_set_font_size(False)
drawn.set_fontsize(8.5)
for (r, _), cell in drawn.get_celld().items():
    cell.set_edgecolor("#cccccc")
    if r == 0:
        cell.set_text_props(fontweight="bold")
    elif r % 2 == 1:
        cell.set_facecolor("#f5f5f5")
fig.savefig(PNG, bbox_inches="tight", pad_inches=0.08, facecolor="white")
print(f"wrote {NOTEBOOK.relative_to(DOCS.parent)} and {PNG.relative_to(DOCS.parent)}")
