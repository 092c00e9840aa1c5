"""`nntrain fit` on the embedded digits: both engines, the TensorBoard run, the PNGs, the recipe flags,
bad options, an unreachable hub, Ctrl-C and SIGTERM, and a `--help` that loads no torch."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import matplotlib
import pytest
import torch
from PIL import Image

import nntrain
from nntrain import (
    EarlyStoppingS,
    GradAccumS,
    GradClipS,
    MixedPrecisionS,
    SchedulerS,
    cli,
    data,
)
from nntrain.cli import _recipe_subs, build_parser, main, make_model
from nntrain.learner import Learner, Subscriber

matplotlib.use("Agg")

ROW = re.compile(r"^\s*\d+(\s+\S+)+\s+\d\d:\d\d(:\d\d)?\s*$")  # epoch, its values, its time
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def table_rows(out: str) -> list[str]:
    """The epoch table's data rows, whitespace-normalised."""
    return [" ".join(line.split()) for line in out.splitlines() if ROW.match(line)]


def run_dir(out: str) -> Path:
    match = re.search(r"^TensorBoard run: (.+); view it with: tensorboard --logdir (.+)$", out, re.MULTILINE)
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
    """`nntrain fit --epochs 2 --plot` on each engine: engine -> (exit code, stdout, logdir); the logdir's
    name has a space in it."""
    runs = {}
    for engine in ("native", "lightning"):
        logdir = tmp_path_factory.mktemp(f"cli {engine}")
        out = io.StringIO()  # capsys is per test; this fixture runs once per module
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = main(["fit", "--epochs", "2", "--engine", engine, "--logdir", str(logdir), "--plot"])
        runs[engine] = (code, out.getvalue(), logdir)
    return runs


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_fit_prints_the_table_and_writes_a_run(engine_runs, engine):
    code, out, logdir = engine_runs[engine]
    assert code == 0
    header = next(line.split() for line in out.splitlines() if line.split()[:1] == ["epoch"])
    assert header == ["epoch", "train_loss", "valid_loss", "train_accuracy", "valid_accuracy", "time"]
    rows = table_rows(out)  # one row per epoch, with its time, as the notebook's table
    assert [r.split()[0] for r in rows] == ["0", "1"] and all(len(r.split()) == 6 for r in rows)
    assert all(re.fullmatch(r"\d\d:\d\d", r.split()[-1]) for r in rows)
    directory = run_dir(out)
    assert directory.parent.parent == logdir and re.fullmatch(rf"{engine}-\d{{8}}-\d{{6}}", directory.parent.name)
    assert directory.name == "version_0"
    assert len(list(directory.glob("events.out.tfevents.*"))) == 1
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

    monkeypatch.setattr(data, "_hub_unreachable", lambda: None)  # the probe passes, the load fails
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
    (["fit", "--seed", "x"], "--seed: must be an integer, got x"),
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


# ----- an unreachable hub: one line at once, the hub client never called ----------------------------

PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")


@pytest.fixture
def online_settings(monkeypatch):
    """No offline switch, no proxy, the default endpoint: the probe goes to huggingface.co:443."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def refuse_hub_calls(monkeypatch):
    def load_dataset(*args, **kwargs):
        pytest.fail("datasets.load_dataset was called although the hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_an_unreachable_hub_fails_in_one_line_without_calling_it(tmp_path, online_settings, capsys):
    addresses = []

    def no_network(address, *args, **kwargs):
        addresses.append(address)
        raise OSError(101, "Network is unreachable")

    online_settings.setattr("socket.create_connection", no_network)
    refuse_hub_calls(online_settings)
    start = time.perf_counter()
    assert main(["fit", "--dataset", "mnist", "--logdir", str(tmp_path)]) == 1
    assert time.perf_counter() - start < 3
    assert addresses == [("huggingface.co", 443)]
    result = capsys.readouterr()
    assert_one_error_line(result, "could not load dataset 'mnist' from the hub: cannot connect to the hub "
                                  "huggingface.co:443 ([Errno 101] Network is unreachable;")
    assert result.err.rstrip().endswith("use --dataset digits for the embedded data")


def test_the_hub_probe_gives_up_after_its_timeout(online_settings):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(10)
        raise TimeoutError("timed out")

    online_settings.setattr("socket.create_connection", hang)
    start = time.perf_counter()
    try:
        reason = data._hub_unreachable(timeout=0.2)
    finally:
        release.set()
    assert time.perf_counter() - start < 1
    assert reason.startswith("cannot connect to the hub huggingface.co:443 (no answer within 0.2 s;")


@pytest.mark.parametrize("env, address", [
    ({}, ("huggingface.co", 443)),
    ({"HF_ENDPOINT": "http://hub.internal:8080"}, ("hub.internal", 8080)),
    ({"HTTPS_PROXY": "http://proxy.internal:3128"}, ("proxy.internal", 3128)),
    ({"HTTPS_PROXY": "proxy.internal:3128", "NO_PROXY": "huggingface.co"}, ("huggingface.co", 443)),
])
def test_the_hub_probe_connects_where_the_hub_client_would(online_settings, env, address):
    tried = []
    for name, value in env.items():
        online_settings.setenv(name, value)
    # io.BytesIO: any object with close() stands for the socket
    online_settings.setattr("socket.create_connection", lambda where, *a, **k: tried.append(where) or io.BytesIO())
    assert data._hub_unreachable() is None
    assert tried == [address]


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_mode_loads_the_cache_without_probing_and_quietly(online_settings, switch):
    online_settings.setenv(switch, "1")
    online_settings.setattr(data, "_hub_unreachable", lambda: pytest.fail("probed the hub in offline mode"))
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    levels_before = [logger.level for logger in loggers]
    levels_during_the_call = []

    def cached(name):
        levels_during_the_call.append([logger.getEffectiveLevel() for logger in loggers])
        return "the cached DatasetDict"

    online_settings.setattr(datasets, "load_dataset", cached)
    assert data.load_dataset_dict("mnist") == "the cached DatasetDict"
    assert levels_during_the_call == [[logging.ERROR, logging.ERROR]]
    assert [logger.level for logger in loggers] == levels_before  # quiet for that call only


# ----- Ctrl-C and SIGTERM: 130 and 143, one line on stderr -------------------------------------------

STOPPED = re.compile(r"^nntrain: interrupted \((SIGINT|SIGTERM)\) in epoch (\d+) \(\2 of (\d+) epochs finished\); "
                     r"TensorBoard run: (.+?)(?:; best weights: (.+) \(epoch \d+\))?$")


def test_sigterm_ends_a_fit_with_status_143_and_a_pipe_gets_no_progress_frames(tmp_path):
    best = tmp_path / "best.pt"
    # with its default progress display: into a pipe that is the rows only, no progress frames
    command = [sys.executable, "-m", "nntrain.cli", "fit", "--epochs", "500", "--hidden", "8",
               "--logdir", str(tmp_path / "runs"), "--save-best", str(best)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as fit:  # bytes: \r kept
        read = []
        try:
            for line in fit.stdout:
                read.append(line)
                if line.split()[:1] == [b"1"]:  # epoch 1 is over: epoch 0 and its best weights are saved
                    fit.send_signal(signal.SIGTERM)
                    break
            out_bytes, err_bytes = fit.communicate(timeout=60)
        finally:
            fit.kill()
    assert b"\r" not in b"".join(read) + out_bytes + err_bytes
    out, err = out_bytes.decode(), err_bytes.decode()
    assert fit.returncode == 143, err
    assert len(err.splitlines()) == 1, err
    match = STOPPED.match(err.strip())
    assert match and match.group(1) == "SIGTERM" and match.group(3) == "500", err
    assert Path(match.group(4)).is_dir() and Path(match.group(5)) == best and best.is_file()
    assert "TensorBoard run:" not in out  # the success line is not printed


class SignalAfterEpoch(Subscriber):
    """Sends `signum` to this process once the first epoch's validation pass ends."""

    def __init__(self, signum: int) -> None:
        self.signum, self.sent = signum, False

    def after_epoch(self, learn) -> None:
        if not learn.model.training and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("engine, signame, status", [
    ("lightning", "SIGINT", 130),  # Lightning catches Ctrl-C and calls sys.exit(1)
    ("lightning", "SIGTERM", 143),  # Lightning's own SIGTERM handler would end with status 0
    ("native", "SIGINT", 130),
])
def test_an_interrupted_fit_says_where_it_stopped(tmp_path, monkeypatch, capsys, engine, signame, status):
    signum = signal.Signals[signame]
    recipe_subs = cli._recipe_subs
    monkeypatch.setattr(cli, "_recipe_subs", lambda args: [*recipe_subs(args), SignalAfterEpoch(signum)])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code = main(["fit", "--engine", engine, "--epochs", "50", "--hidden", "8", "--no-progress",
                 "--logdir", str(tmp_path)])
    result = capsys.readouterr()
    assert code == status, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and STOPPED.match(lines[0]), result.err
    assert STOPPED.match(lines[0]).group(1) == signame
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back


# ----- the quoted tensorboard command, `--help` without torch, the package's lazy names ------------


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_the_tensorboard_command_is_shell_quoted(engine_runs, engine):
    _, out, logdir = engine_runs[engine]
    assert " " in str(logdir)
    command = out.splitlines()[-1].split("view it with: ")[1]
    assert command == f"tensorboard --logdir '{logdir}'"
    assert shlex.split(command) == ["tensorboard", "--logdir", str(logdir)]


def test_help_and_version_load_no_torch():
    code = """if True:
        import contextlib, io, sys
        from nntrain.cli import main
        for argv in (["--version"], ["--help"], ["fit", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    main(argv)
                except SystemExit as exc:
                    assert exc.code == 0, (argv, exc.code)
            assert out.getvalue().strip(), argv
        print([m for m in ("torch", "numpy", "datasets", "lightning") if m in sys.modules])
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("argv, needle", [(["--help"], "{fit}"), (["fit", "--help"], "--epochs EPOCHS"),
                                          (["--version"], "nntrain 0.1.0")])
def test_python_m_nntrain_cli_answers_without_torch(argv, needle):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "nntrain.cli", *argv],
                          capture_output=True, text=True, check=True)
    assert needle in done.stdout
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "nntrain" in imported and not {name for name in imported if name.split(".")[0] == "torch"}


def test_every_public_name_comes_from_the_package():
    code = "import sys, nntrain; print(sorted(set(nntrain.__all__) - set(dir(nntrain))), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False"  # listed before any is loaded, and nothing loaded torch
    assert sorted(nntrain._EXPORTS) == sorted(nntrain.__all__)
    for name in nntrain.__all__:
        assert getattr(nntrain, name) is getattr(sys.modules[nntrain._EXPORTS[name]], name), name
    star: dict = {}
    exec("from nntrain import *", star)
    assert set(nntrain.__all__) <= set(star)
    assert not hasattr(nntrain, "no_such_name")


def test_save_best_on_a_full_disk_is_one_error_line_after_the_epoch_is_saved(tmp_path, capsys, monkeypatch):
    import nntrain.weights as weights
    from nntrain.checkpoint import CheckpointError

    def full_disk(state, path):
        raise CheckpointError(f"could not write checkpoint {path}: OSError: [Errno 28] No space left on device")
    monkeypatch.setattr(weights, "save_checkpoint", full_disk)
    best = tmp_path / "best.pt"
    assert main(["fit", "--epochs", "2", "--save-best", str(best), "--logdir", str(tmp_path / "runs")]) == 1
    assert_one_error_line(capsys.readouterr(), "No space left on device")
