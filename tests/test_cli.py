"""`nntrain fit` on the embedded digits: both engines, the TensorBoard run, the PNGs, bad options."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import datasets
import matplotlib
import pytest
import torch
from PIL import Image

from nntrain.cli import main

matplotlib.use("Agg")

ROW = re.compile(r"^\s*\d+\s+(train|valid)\s+\S+\s+\S+\s*$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def table_rows(out: str) -> list[str]:
    """The epoch table's data rows, whitespace-normalised."""
    return [" ".join(line.split()) for line in out.splitlines() if ROW.match(line)]


def run_dir(out: str) -> Path:
    match = re.search(r"TensorBoard run: (\S+); view it with: tensorboard --logdir (\S+)", out)
    assert match, out
    return Path(match.group(1))


def assert_png(path: Path) -> None:
    """`path` is a real PNG of non-trivial size."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 5_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 200


def assert_one_error_line(capsys_result, needle: str) -> None:
    err_lines = [line for line in capsys_result.err.splitlines() if line.strip()]
    assert err_lines == [err_lines[0]] and err_lines[0].startswith("nntrain: error:"), capsys_result.err
    assert needle in err_lines[0]
    assert "Traceback" not in capsys_result.err + capsys_result.out


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """`nntrain fit --epochs 2 --plot` on each engine: engine -> (exit code, stdout, logdir)."""
    runs = {}
    for engine in ("native", "lightning"):
        logdir = tmp_path_factory.mktemp(f"cli_{engine}")
        out = io.StringIO()  # capsys is per test; this fixture runs once per module
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = main(["fit", "--epochs", "2", "--engine", engine, "--logdir", str(logdir), "--plot"])
        runs[engine] = (code, out.getvalue(), logdir)
    return runs


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_fit_prints_the_table_and_writes_a_run(engine_runs, engine):
    code, out, logdir = engine_runs[engine]
    assert code == 0
    rows = table_rows(out)
    assert [r.split()[:2] for r in rows] == [["0", "train"], ["0", "valid"], ["1", "train"], ["1", "valid"]]
    directory = run_dir(out)
    assert directory.parent.parent == logdir and re.fullmatch(rf"{engine}-\d{{8}}-\d{{6}}", directory.parent.name)
    assert directory.name == "version_0"
    assert len(list(directory.glob("events.out.tfevents.*"))) == 1
    assert f"tensorboard --logdir {logdir}" in out
    assert_png(directory / "losses.png")


def test_both_engines_print_the_same_rows(engine_runs):
    assert table_rows(engine_runs["native"][1]) == table_rows(engine_runs["lightning"][1])


def test_lr_find_saves_its_plot_and_prints_the_suggestion(tmp_path, capsys):
    assert main(["fit", "--epochs", "1", "--logdir", str(tmp_path), "--lr-find", "--no-progress"]) == 0
    out = capsys.readouterr().out
    suggestion = re.search(r"lr finder: suggested lr (\S+)", out)
    assert suggestion and 1e-5 <= float(suggestion.group(1)) <= 10
    assert len(table_rows(out)) == 0  # --no-progress: MetricsS prints its own row format
    assert out.count("epoch 0 | ") == 2  # the search itself printed no rows
    assert_png(run_dir(out) / "lr_find.png")


# ----- bad options: one line on stderr, non-zero exit, no traceback ----------------------------------


def test_zero_epochs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--epochs", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --epochs: must be a positive integer, got 0" in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(tmp_path, capsys):
    assert main(["fit", "--device", "cuda", "--logdir", str(tmp_path)]) == 1
    assert_one_error_line(capsys.readouterr(), "CUDA is not available")


def test_a_dataset_that_cannot_be_loaded(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert main(["fit", "--dataset", "no-such/dataset", "--logdir", str(tmp_path)]) == 1
    assert_one_error_line(capsys.readouterr(), "could not load dataset 'no-such/dataset'")


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_an_unwritable_logdir_fails_before_training(tmp_path, capsys, engine):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["fit", "--engine", engine, "--logdir", str(blocker / "runs")]) == 1
    result = capsys.readouterr()
    assert_one_error_line(result, "cannot create the TensorBoard log directory")
    assert table_rows(result.out) == [] and "nntrain fit:" not in result.out


def test_plot_needs_the_progress_display(tmp_path, capsys):
    assert main(["fit", "--plot", "--no-progress", "--logdir", str(tmp_path)]) == 1
    assert_one_error_line(capsys.readouterr(), "--plot")


@pytest.mark.parametrize("args, message", [
    (["fit", "--epochs", "abc"], "--epochs: must be a positive integer, got abc"),
    (["fit", "--lr", "inf"], "--lr: must be a finite number > 0, got inf"),
    (["fit", "--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    (["fit", "--momentum", "x"], "--momentum: must be a number in [0, 1), got x"),
])
def test_bad_numbers_are_one_line_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == "nntrain 0.1.0"
