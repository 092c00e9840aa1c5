"""TensorBoardS on both engines: event files read back with TensorBoard's own reader and served by a
real `tensorboard` process; run directories, bad log dirs and the no-sync per-batch path."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from nntrain.learner import Learner, Subscriber
from nntrain.subscribers.metrics import MetricsS, batch_accuracy
from nntrain.subscribers.tensorboard import (
    BATCH_LOSS,
    BATCH_LR,
    TensorBoardS,
    epoch_tag,
    next_version_dir,
)
from tests.helpers import Recorder, tiny_dls, tiny_model

ENGINES = ("native", "lightning")
EPOCHS, LR = 2, 0.1
EXPECTED_TAGS = {BATCH_LOSS, BATCH_LR} | {epoch_tag(m, n) for m in ("train", "valid") for n in ("loss", "accuracy")}
def f32(x: float) -> float:
    """`x` as TensorBoard stores it (float32)."""
    return float(np.float32(x))


def event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("events.out.tfevents.*"))


def read_run(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return acc


def lightning_logger(root: Path, name: str):
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(root), name=name, default_hp_metric=False)


def make_learner(*subs: Subscriber) -> Learner:
    return Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=LR, subs=list(subs))


def fit(engine: str, root: Path, name: str, *extra: Subscriber, logger: bool | None = True
        ) -> tuple[TensorBoardS, MetricsS]:
    """Fit `EPOCHS` epochs with a MetricsS and a TensorBoardS under `root/name`; on Lightning through
    a TensorBoardLogger of the test's (`logger=True`), without one (`False`), or the bridge's (`None`)."""
    metrics, tb = MetricsS(accuracy=batch_accuracy), TensorBoardS(root, name)
    learn = make_learner(metrics, tb, *extra)
    kwargs = {}
    if engine == "lightning" and logger is not None:
        kwargs["logger"] = lightning_logger(root, name) if logger else False
    torch.manual_seed(0)
    learn.fit(EPOCHS, engine=engine, **kwargs)
    return tb, metrics


class LossLog(Subscriber):
    """Records each training batch's (global step, loss, lr) the slow way, for comparison."""

    order = 30

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []

    def after_loss(self, learn) -> None:
        if learn.model.training:
            self.points.append((learn.global_step, learn.loss.item(), learn.opt.param_groups[0]["lr"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run per engine in one log root: engine -> (run dir, MetricsS, LossLog)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for engine in ENGINES:
        log = LossLog()
        tb, metrics = fit(engine, root, engine, log)
        out[engine] = (tb.log_dir, metrics, log)
    return root, out


# ----- the event files ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_events_hold_the_batch_losses_lrs_and_metrics(runs, engine):
    root, by_engine = runs
    run_dir, metrics, log = by_engine[engine]
    assert run_dir == root / engine / "version_0"
    assert len(event_files(run_dir)) == 1  # one file per run, also when writing through Lightning's logger
    acc = read_run(run_dir)
    assert EXPECTED_TAGS <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars(BATCH_LOSS)] == [(s, f32(loss)) for s, loss, _ in log.points]
    assert [(e.step, e.value) for e in acc.Scalars(BATCH_LR)] == [(s, f32(lr)) for s, _, lr in log.points]
    assert [e.step for e in acc.Scalars(BATCH_LOSS)] == list(range(EPOCHS * len(tiny_dls().train)))
    for row in metrics.history:  # every MetricsS value, at step = epoch
        for name in ("loss", "accuracy"):
            events = acc.Scalars(epoch_tag(row["mode"], name))
            assert [(e.step, e.value) for e in events if e.step == row["epoch"]] == [(row["epoch"], f32(row[name]))]
    assert len(acc.Scalars(epoch_tag("valid", "loss"))) == EPOCHS


def test_both_engines_write_the_same_tags(runs):
    _, by_engine = runs
    tags = {engine: set(read_run(by_engine[engine][0]).Tags()["scalars"]) for engine in ENGINES}
    assert tags["native"] == EXPECTED_TAGS
    assert tags["lightning"] == tags["native"]


@pytest.mark.parametrize("engine", ENGINES)
def test_hyperparameters_are_written(runs, engine):
    _, by_engine = runs
    acc = read_run(by_engine[engine][0])
    content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    hp = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    assert hp == {"lr": LR, "batch_size": 16, "epochs": EPOCHS, "optimizer": "SGD", "model": "Sequential",
                  "engine": engine}
    experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
    assert {m.name.tag for m in experiment.metric_infos} == {t for t in EXPECTED_TAGS if t.startswith("epoch/")}
    assert "hp_metric" not in acc.Tags()["scalars"]


def test_lightning_run_uses_the_loggers_directory(runs):
    _, by_engine = runs
    run_dir = by_engine["lightning"][0]
    assert (run_dir / "hparams.yaml").read_text().count(":") >= 6  # logger.log_hyperparams was called


def test_lightning_without_a_tensorboard_logger_opens_its_own_writer(tmp_path):
    tb, metrics = fit("lightning", tmp_path, "own", logger=False)
    assert tb.log_dir == tmp_path / "own" / "version_0"
    assert len(event_files(tb.log_dir)) == 1
    assert not (tb.log_dir / "hparams.yaml").exists()  # no Lightning logger was involved
    assert set(read_run(tb.log_dir).Tags()["scalars"]) == EXPECTED_TAGS


def test_lightning_by_default_gets_a_tensorboard_logger_at_the_subscribers_place(tmp_path):
    tb, metrics = fit("lightning", tmp_path, "auto", logger=None)
    assert tb.log_dir == tmp_path / "auto" / "version_0"
    assert len(event_files(tb.log_dir)) == 1
    assert (tb.log_dir / "hparams.yaml").exists()  # written through the Trainer's TensorBoardLogger
    assert set(read_run(tb.log_dir).Tags()["scalars"]) == EXPECTED_TAGS


# ----- TensorBoard serves them -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def tensorboard_server(runs):
    """A real `tensorboard` on 127.0.0.1 serving the runs' root; yields its base URL; always killed."""
    root, _ = runs
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_tensorboard_serves_the_scalars(tensorboard_server, runs):
    base, proc = tensorboard_server
    _, by_engine = runs
    expected_runs = {f"{engine}/version_0" for engine in ENGINES}
    deadline, tags, last_error = time.monotonic() + 45, {}, None
    while time.monotonic() < deadline:  # until it answers and has loaded both runs
        assert proc.poll() is None, "tensorboard exited early"
        try:
            tags = _get_json(f"{base}/data/plugin/scalars/tags")
            if expected_runs <= set(tags) and all(EXPECTED_TAGS <= set(tags[r]) for r in expected_runs):
                break
        except OSError as exc:  # not listening yet
            last_error = exc
        time.sleep(0.25)
    else:
        pytest.fail(f"tensorboard did not serve both runs within 45 s (tags={tags}, last error={last_error})")
    assert set(tags["native/version_0"]) == EXPECTED_TAGS
    assert set(tags["lightning/version_0"]) == EXPECTED_TAGS
    query = urllib.parse.urlencode({"run": "native/version_0", "tag": epoch_tag("valid", "loss")})
    series = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")  # [[wall_time, step, value], ...]
    metrics = by_engine["native"][1]
    assert [(step, value) for _, step, value in series] == [
        (row["epoch"], f32(row["loss"])) for row in metrics.rows("valid")
    ]


# ----- run directories and bad input --------------------------------------------------------------------


def test_a_run_name_that_exists_gets_the_next_version(tmp_path):
    first, _ = fit("native", tmp_path, "same")
    second, _ = fit("native", tmp_path, "same")
    assert (first.log_dir.name, second.log_dir.name) == ("version_0", "version_1")
    assert len(event_files(first.log_dir)) == len(event_files(second.log_dir)) == 1
    assert len(read_run(first.log_dir).Scalars(BATCH_LOSS)) == len(read_run(second.log_dir).Scalars(BATCH_LOSS))
    (tmp_path / "same" / "version_7").mkdir()
    (tmp_path / "same" / "version_x").mkdir()
    assert next_version_dir(tmp_path / "same").name == "version_8"


def test_without_a_name_versions_go_in_the_log_dir(tmp_path):
    tb, _ = fit("native", tmp_path, None)
    assert tb.log_dir == tmp_path / "version_0"


@pytest.mark.parametrize("engine", ENGINES)
def test_an_unwritable_log_dir_fails_before_any_batch(tmp_path, engine):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    recorder = Recorder()
    learn = make_learner(recorder, TensorBoardS(blocker / "runs", "x"))
    with pytest.raises(OSError, match="cannot create the TensorBoard .*a_file"):
        learn.fit(1, engine=engine)
    assert not any(event == "before_batch" for event, *_ in recorder.trace)


class FailAt(Subscriber):
    """Raises in the `n`th training batch, after its loss is known."""

    def __init__(self, n: int) -> None:
        self.n = n

    def after_batch(self, learn) -> None:
        if learn.model.training and learn.global_step == self.n:
            raise RuntimeError("boom")


@pytest.mark.parametrize("engine", ENGINES)
def test_batches_before_an_error_are_written(tmp_path, engine):
    tb = TensorBoardS(tmp_path, "err")
    learn = make_learner(MetricsS(), tb, FailAt(4))
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(1, engine=engine)
    assert [e.step for e in read_run(tb.log_dir).Scalars(BATCH_LOSS)] == [0, 1, 2, 3]
    assert len(event_files(tb.log_dir)) == 1


class Window(Subscriber):
    """Opens (`opening=True`, runs just before TensorBoardS) or closes (just after) a window
    around TensorBoardS's per-batch handler."""

    def __init__(self, state: dict, opening: bool) -> None:
        self.state, self.opening = state, opening
        self.order = TensorBoardS.order - 1 if opening else TensorBoardS.order + 1

    def after_loss(self, learn) -> None:
        self.state["open"] = self.opening


def test_the_batch_path_does_not_sync(tmp_path, monkeypatch):
    """No `.item()`/`float()` in the per-batch handler: the losses reach the host once per epoch."""
    state = {"open": False, "host_reads": []}
    learn = make_learner(TensorBoardS(tmp_path, "nosync"), Window(state, True), Window(state, False))
    item, to_float, tolist = torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.tolist

    def guard(original):
        def read(self, *args):
            if state["open"]:
                raise AssertionError("TensorBoardS read a tensor on the host in a batch")
            return original(self, *args)
        return read

    def counted_tolist(self):
        if sys._getframe(1).f_globals["__name__"] == TensorBoardS.__module__:  # not the sampler's
            state["host_reads"].append(tuple(self.shape))
        return guard(tolist)(self)

    monkeypatch.setattr(torch.Tensor, "item", guard(item))
    monkeypatch.setattr(torch.Tensor, "__float__", guard(to_float))
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    learn.fit(EPOCHS)
    monkeypatch.undo()
    assert state["host_reads"] == [(len(tiny_dls().train),)] * EPOCHS  # one copy per training epoch
