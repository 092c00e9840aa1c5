"""Shared bits of the benchmark scripts: arguments, device and threads, timing, environment
info, and the JSON-lines / Markdown / PNG output."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_OUT",
    "base_parser",
    "setup_device",
    "sync",
    "clock",
    "since",
    "env_info",
    "median",
    "spread",
    "markdown_table",
    "target_line",
    "bar_chart",
    "write_outputs",
]

DEFAULT_OUT = Path(__file__).parent / "results"
"""Where results go unless `--out` says otherwise (gitignored)."""


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: `--quick`, `--device`, `--threads`, `--out`, `--repeats`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny step counts and 1 repeat (seconds; for CI)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, for stable timings)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed repeats (median reported)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    return p


def setup_device(name: str | None, threads: int) -> torch.device:
    """The device to run on (CUDA when present unless `name` says), with torch's CPU threads set."""
    torch.set_num_threads(threads)
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued kernels: around timed regions, and only on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock() -> tuple[float, float]:
    """Wall-clock and process CPU time, in seconds."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    """Wall-clock and CPU seconds elapsed since `t0 = clock()`. On CPU with one thread, CPU time
    leaves out the time the process waited for a core: a steadier measure on a shared machine."""
    wall, cpu = clock()
    return wall - t0[0], cpu - t0[1]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)  # without importing it (Lightning takes seconds)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_info(device: torch.device) -> dict[str, Any]:
    """Device name, library versions, threads and date, recorded with every result."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def median(xs: list[float]) -> float:
    """The median of `xs`."""
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """The interquartile range of `xs` (0 for fewer than 2 values)."""
    if len(xs) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q3 - q1


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table; numbers right-aligned."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def target_line(name: str, target: str, measured: str, met: bool | None) -> str:
    """`name: target / measured / met` (met is `n/a` when the target does not apply here)."""
    return f"{name}: {target} / {measured} / {'n/a' if met is None else ('yes' if met else 'NO')}"


def bar_chart(path: Path, panels: dict[str, dict[str, float]], xlabel: str, title: str,
              log: bool = False) -> None:
    """Horizontal bars, one panel per key of `panels` (label -> value), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.5 * max(map(len, panels.values())) + 1.5),
                             squeeze=False)
    for ax, (panel, bars) in zip(axes[0], panels.items()):
        labels, values = list(bars), list(bars.values())
        ax.barh(labels, values, color="tab:blue")
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.3g}" if v < 10 else f" {v:,.0f}", va="center", fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.margins(x=0.25)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(out: Path, name: str, rows: list[dict[str, Any]], env: dict[str, Any], table: str,
                  notes: list[str]) -> dict[str, Path]:
    """Write `<name>.jsonl` (one line per row, with `env`), `<name>.md` (env, table, notes) into `out`.

    Returns:
        The paths written, by kind ("jsonl", "md").
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": out / f"{name}.jsonl", "md": out / f"{name}.md"}
    with paths["jsonl"].open("w") as f:
        for row in rows:
            f.write(json.dumps({**row, **env}) + "\n")
    header = (f"# {name}\n\n{env['device_name']} ({env['device']}), torch {env['torch']}, lightning "
              f"{env['lightning']}, Python {env['python']}, torch.set_num_threads({env['threads']}), {env['date']}\n")
    paths["md"].write_text(header + "\n" + table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return paths


def report(args: argparse.Namespace, name: str, rows: list[dict[str, Any]], env: dict[str, Any], table: str,
           notes: list[str], targets: list[str], chart: dict[str, Any]) -> None:
    """Write the JSON lines, Markdown and PNG chart (`chart` holds `bar_chart`'s other arguments),
    and print the table and the target lines."""
    notes = [*notes, "Targets (target / measured / met):", *[f"  {t}" for t in targets]]
    if args.quick:
        notes.insert(0, "--quick run: step counts too small for the numbers to mean anything; it checks the script runs.")
    paths = write_outputs(args.out, name, rows, env, table, notes)
    png = args.out / f"{name}.png"
    bar_chart(png, **chart)
    print("\n" + table + "\n")
    print("\n".join(targets))
    print(f"wrote {paths['jsonl']}, {paths['md']}, {png}")
