"""`nntrain fit` on the embedded digits: both engines, the TensorBoard run, the PNGs, the recipe flags,
bad options."""

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

from nntrain import EarlyStoppingS, GradAccumS, GradClipS, MixedPrecisionS, SchedulerS
from nntrain.cli import _recipe_subs, build_parser, main, make_model
from nntrain.learner import Learner

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


# ----- the recipe flags ---------------------------------------------------------------------------

VALID_ROW = re.compile(r"^epoch (\d+) \| valid \| loss (\S+) \| accuracy (\S+)$", re.MULTILINE)
BEST_LINE = re.compile(r"^best weights: (\S+) \(valid/accuracy (\S+) at epoch (\d+)\)$", re.MULTILINE)
RECIPE_EPOCHS, RECIPE_LR, TRAIN_BATCHES = 5, 20.0, 23  # 1438 digits / batch size 64
# One-cycle peaks at --lr 20 in epoch 1: valid/loss rises there and --early-stop 1 ends the fit.
RECIPE_FLAGS = ["--epochs", str(RECIPE_EPOCHS), "--hidden", "16", "--lr", str(RECIPE_LR), "--no-progress",
                "--one-cycle", "--precision", "bf16", "--clip", "1", "--accumulate", "2", "--early-stop", "1"]


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """All recipe flags at once on each engine: engine -> (exit code, stdout, --save-best path,
    the learner, the subscribers its fit ran with)."""
    runs = {}
    real_fit = Learner.fit
    for engine in ("native", "lightning"):
        tmp = tmp_path_factory.mktemp(f"recipe_{engine}")
        best = tmp / "out" / "best.pt"  # its folder does not exist yet
        fits = []

        def recording_fit(self, *args, **kwargs):
            fits.append((self, list(kwargs.get("subs", ()))))
            return real_fit(self, *args, **kwargs)

        out = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(io.StringIO()):
            mp.setattr(Learner, "fit", recording_fit)
            code = main(["fit", "--engine", engine, "--logdir", str(tmp / "runs"), "--save-best", str(best),
                         *RECIPE_FLAGS])
        assert len(fits) == 1, fits
        runs[engine] = (code, out.getvalue(), best, *fits[0])
    return runs


def only(subs, kind):
    """The one subscriber of type `kind` in `subs`."""
    found = [s for s in subs if isinstance(s, kind)]
    assert len(found) == 1, subs
    return found[0]


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_recipe_flags_together(recipe_runs, engine):
    code, out, best, learn, subs = recipe_runs[engine]
    assert code == 0, out
    valid = [(int(e), float(loss), acc) for e, loss, acc in VALID_ROW.findall(out)]
    # Early stop: the loss rose after epoch 0, so the fit ended after epoch 1 of 5.
    assert [e for e, _, _ in valid] == [0, 1] and valid[1][1] > valid[0][1], out
    assert "early stop: after epoch 1 (valid/loss did not improve for 1 epoch)" in out
    assert only(subs, EarlyStoppingS).stopped_epoch == 1

    # One-cycle over 5 epochs of ceil(23 / 2) steps (accumulation halves the steps), peaking at --lr.
    assert only(subs, GradAccumS).n == 2
    lrs = only(subs, SchedulerS).lrs
    steps_per_epoch = -(-TRAIN_BATCHES // 2)
    assert len(lrs) == 1 + 2 * steps_per_epoch  # the start, then one per step of the 2 epochs run
    assert lrs[0] == pytest.approx(RECIPE_LR / 25)
    assert max(lrs) == pytest.approx(RECIPE_LR) and lrs.index(max(lrs)) == RECIPE_EPOCHS * steps_per_epoch // 4
    assert only(subs, GradClipS).max_norm == 1.0
    assert only(subs, MixedPrecisionS).dtype is torch.bfloat16

    # Best weights: the first epoch with the highest printed accuracy, in a file the CLI's model loads.
    match = BEST_LINE.search(out)
    assert match, out
    accuracies = [acc for _, _, acc in valid]
    best_epoch = max(range(len(valid)), key=lambda i: float(accuracies[i]))
    assert Path(match.group(1)) == best and int(match.group(3)) == best_epoch
    assert match.group(2) == accuracies[best_epoch]
    saved = torch.load(best, weights_only=True)["model"]
    model = make_model(64, 16, 10)
    model.load_state_dict(saved)
    final = learn.model.state_dict()
    # Kept from its epoch, not overwritten by later ones.
    same_as_final = all(torch.equal(saved[k].cpu(), final[k].cpu()) for k in final)
    assert same_as_final == (best_epoch == valid[-1][0])
    assert out.index("best weights:") < out.index("TensorBoard run:")


def test_recipe_flags_give_the_same_run_on_both_engines(recipe_runs):
    native, lightning = recipe_runs["native"], recipe_runs["lightning"]
    assert VALID_ROW.findall(native[1]) == VALID_ROW.findall(lightning[1])
    torch.testing.assert_close(torch.load(native[2], weights_only=True)["model"],
                               torch.load(lightning[2], weights_only=True)["model"])


@pytest.mark.parametrize("precision, dtype", [("32", None), ("bf16", torch.bfloat16), ("16", torch.float16)])
def test_precision_flag_picks_the_autocast_dtype(precision, dtype):
    subs = _recipe_subs(build_parser().parse_args(["fit", "--precision", precision]))
    assert [s.dtype for s in subs if isinstance(s, MixedPrecisionS)] == ([] if dtype is None else [dtype])


def test_no_recipe_flags_attach_no_recipe_subscribers():
    assert _recipe_subs(build_parser().parse_args(["fit"])) == []


def test_lr_find_then_the_monitoring_recipes(tmp_path, capsys):
    code = main(["fit", "--epochs", "3", "--hidden", "16", "--lr-find", "--early-stop", "1", "--no-progress",
                 "--save-best", str(tmp_path / "best.pt"), "--logdir", str(tmp_path / "runs")])
    result = capsys.readouterr()
    assert code == 0, result.err
    assert len(VALID_ROW.findall(result.out)) >= 2 and (tmp_path / "best.pt").is_file()


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_save_best_at_a_directory_fails_before_training(tmp_path, capsys, engine):
    assert main(["fit", "--engine", engine, "--save-best", str(tmp_path), "--logdir", str(tmp_path / "runs")]) == 1
    result = capsys.readouterr()
    assert_one_error_line(result, f"--save-best {tmp_path} is a directory")
    assert "nntrain fit:" not in result.out and not (tmp_path / "runs").exists()


def test_save_best_under_a_file_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["fit", "--save-best", str(blocker / "best.pt"), "--logdir", str(tmp_path / "runs")]) == 1
    result = capsys.readouterr()
    assert_one_error_line(result, f"{blocker} is not a writable directory")
    assert "nntrain fit:" not in result.out


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
    (["fit", "--accumulate", "0"], "--accumulate: must be a positive integer, got 0"),
    (["fit", "--accumulate", "1.5"], "--accumulate: must be a positive integer, got 1.5"),
    (["fit", "--clip", "-1"], "--clip: must be a finite number > 0, got -1"),
    (["fit", "--clip", "0"], "--clip: must be a finite number > 0, got 0"),
    (["fit", "--early-stop", "0"], "--early-stop: must be a positive integer, got 0"),
    (["fit", "--precision", "8"], "--precision: invalid choice: '8' (choose from '32', 'bf16', '16')"),
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
