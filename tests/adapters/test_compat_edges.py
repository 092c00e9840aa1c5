"""Lightning's edges (issue 23) and a consistent Lightning engine: each feature gives the native
numbers, or is refused before the first batch with a message naming the nntrain alternative;
`fit` returns the same on both engines, and a bridged run shows what was asked for and hides
what users cannot act on."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    GradientAccumulationScheduler,
    ModelSummary,
    OnExceptionCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.tuner import Tuner

from nntrain.adapters import LearnerModule, to_lightning, trainer_defaults
from nntrain.checkpoint import list_checkpoints
from nntrain.learner import Learner
from nntrain.subscribers.checkpoint import CheckpointS
from nntrain.subscribers.gradients import GradAccumS
from nntrain.subscribers.metrics import MetricsS
from nntrain.subscribers.progress import ProgressS
from nntrain.subscribers.stopping import EarlyStoppingS
from nntrain.subscribers.tensorboard import TensorBoardS
from tests.helpers import Recorder, tiny_dls, tiny_model
from tests.test_checkpoint import EPOCHS, StopAt, assert_same, make

CPU = torch.device("cpu")


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def adam_learner(*subs):
    metrics = MetricsS()
    metrics.output = lambda row: None
    return Learner(tiny_model(), tiny_dls(), F.cross_entropy, torch.optim.Adam, lr=0.01, subs=[metrics, *subs]), metrics


def own_trainer(learn, **options):
    module, callbacks = to_lightning(learn)
    extra = options.pop("callbacks", [])
    return L.Trainer(callbacks=[*callbacks, *extra], **{**trainer_defaults(CPU), **options}), module


def assert_untouched(learn, weights):
    assert learn.global_step == 0 and learn.engine.name == "native"
    assert all(torch.equal(a, b) for a, b in zip(weights, learn.model.parameters()))


# ----- refused before the first batch, naming the alternative ---------------------------------------


@pytest.mark.parametrize("how, match", [
    ("fit: GradientAccumulationScheduler", r"GradAccumS\(n\)"),
    ("own: GradientAccumulationScheduler", r"GradAccumS\(n\)"),
    ("own: BatchSizeFinder", r"batch_size"),
    ("own: Tuner.scale_batch_size", r"batch_size"),
    ("own: max_steps without max_epochs", r"give max_epochs as well"),
    ("own: max_epochs=-1", r"give max_epochs as well"),
    ("fit: ckpt_path", r"resume=path"),
])
def test_refused_before_the_first_batch_naming_the_alternative(how, match):
    rec = Recorder()
    learn, metrics = adam_learner(rec)
    weights = [p.detach().clone() for p in learn.model.parameters()]
    trainer, module = own_trainer(learn, max_epochs=1)
    run = {
        "fit: GradientAccumulationScheduler": lambda: learn.fit(
            1, engine="lightning", callbacks=[GradientAccumulationScheduler({0: 2})]),
        "fit: ckpt_path": lambda: learn.fit(1, engine="lightning", ckpt_path="x.ckpt"),
        "own: GradientAccumulationScheduler": lambda: own_fit(learn, callbacks=[GradientAccumulationScheduler({0: 2})]),
        "own: BatchSizeFinder": lambda: own_fit(learn, callbacks=[BatchSizeFinder()]),
        "own: Tuner.scale_batch_size": lambda: Tuner(trainer).scale_batch_size(module),
        "own: max_steps without max_epochs": lambda: own_fit(learn, max_steps=12, max_epochs=None),
        "own: max_epochs=-1": lambda: own_fit(learn, max_epochs=-1),
    }[how]
    with pytest.raises(ValueError, match=match):
        quiet(run)
    assert rec.trace == [] and metrics.history == []
    assert_untouched(learn, weights)
    assert learn.opt is None or type(learn.opt) is torch.optim.Adam  # not Lightning's wrapper


def own_fit(learn, **options):
    trainer, module = own_trainer(learn, **{"max_epochs": 1, **options})
    trainer.fit(module)


def test_lightning_cli_gets_a_clear_error_naming_the_alternatives():
    with pytest.raises(TypeError, match=r"LightningCLI.*learn\.fit\(epochs, engine='lightning'"):
        LearnerModule()
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    with pytest.raises(TypeError, match="LearnerModule needs a Learner"):
        quiet(LightningCLI, LearnerModule, args=["fit", "--trainer.max_epochs=1"], seed_everything_default=False)


def test_a_native_checkpoint_as_an_own_trainers_ckpt_path_is_named_and_the_learner_given_back(tmp_path):
    learn, _ = adam_learner(CheckpointS(tmp_path))
    learn.fit(1)
    path = list_checkpoints(tmp_path)[-1]
    other, _ = adam_learner()
    trainer, module = own_trainer(other, max_epochs=2)
    with pytest.raises(ValueError, match=r"native nntrain checkpoint.*resume='.*\.pt'"):
        quiet(trainer.fit, module, ckpt_path=path)
    assert other.engine.name == "native" and other.global_step == 0
    quiet(other.fit, 2, engine="lightning", resume=path)  # the way it names
    assert other.global_step == 12


# ----- native numbers -------------------------------------------------------------------------------


def test_max_steps_with_max_epochs_stops_where_the_native_fit_stops():
    """Own Trainer(max_epochs, max_steps): `n_epochs` is max_epochs, so EarlyStoppingS stops as natively."""
    def stopping_learner():
        learn, metrics = adam_learner(EarlyStoppingS(patience=1))
        learn.lr = 0.0  # the loss never improves: stop after epoch 1
        return learn, metrics

    native, nm = stopping_learner()
    torch.manual_seed(0)
    native.fit(46)
    learn, metrics = stopping_learner()
    trainer, module = own_trainer(learn, max_epochs=46, max_steps=276)
    torch.manual_seed(0)
    quiet(trainer.fit, module)
    assert learn.n_epochs == 46 and metrics.history == nm.history and learn.global_step == native.global_step == 12


def test_before_fit_sees_the_mode_the_last_pass_left_on_both_engines():
    """The same trace for evaluate, fit, fit, evaluate: each `before_fit` sees the mode the last
    pass left (Lightning switches to eval before `trainer.validate`'s hooks, and to train before a
    fit's), and evaluate leaves the model in eval mode."""
    traces = {}
    for engine in ("native", "lightning"):
        rec = Recorder()
        learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, subs=[rec])
        torch.manual_seed(0)
        quiet(learn.evaluate, engine=engine)
        quiet(learn.fit, 1, engine=engine)
        quiet(learn.fit, 1, engine=engine)
        quiet(learn.evaluate, engine=engine)
        traces[engine] = (rec.trace, learn.model.training)
    assert traces["native"] == traces["lightning"]
    assert [t[1] for t in traces["native"][0] if t[0] == "before_fit"] == ["train", "valid", "valid", "valid"]


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_true_precisions_give_the_optimizer_state_back_with_the_model(precision):
    learn, _ = adam_learner()
    quiet(learn.fit, 1, engine="lightning", precision=precision)
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}
    moments = [v for s in learn.opt.state.values() for v in s.values() if v.ndim > 0]
    assert moments and {v.dtype for v in moments} == {torch.float32}
    learn.fit(1)  # a native Adam step after it (it failed: "expected dtype c10::BFloat16")
    assert learn.global_step == 12


def test_a_failed_lightning_fit_gives_the_learner_back():
    learn, _ = adam_learner(StopAt(0, 2, RuntimeError, event="before_batch"))
    with pytest.raises(RuntimeError):
        quiet(learn.fit, 1, engine="lightning")
    assert learn.engine.name == "native" and type(learn.opt) is torch.optim.Adam and learn.dispatch.propagate
    learn.remove_subs([learn.subs[-1]])
    learn.fit(1)
    assert learn.global_step == 8


def test_fit_returns_none_on_both_engines_and_the_trainer_is_learn_trainer():
    learn, _ = adam_learner()
    assert learn.fit(1) is None and learn.trainer is None
    assert quiet(learn.fit, 1, engine="lightning") is None and isinstance(learn.trainer, L.Trainer)
    assert learn.trainer.callback_metrics["valid/loss"].item() == learn.logs["valid/loss"]


def test_hyperparameters_are_in_both_checkpoint_formats(tmp_path):
    from nntrain.checkpoint_state import load_checkpoint

    for engine in ("native", "lightning"):
        learn, _ = adam_learner(CheckpointS(tmp_path / engine), GradAccumS(2))
        quiet(learn.fit, 1, engine=engine)
        hp = load_checkpoint(list_checkpoints(tmp_path / engine)[-1])["hyper_parameters"]
        assert {k: hp[k] for k in ("lr", "optimizer", "batch_size", "epochs", "model", "engine")} == \
            {"lr": 0.01, "optimizer": "Adam", "batch_size": 16, "epochs": 1, "model": "Sequential", "engine": engine}
        assert hp["subs"]["GradAccumS"] == {"n": 2} and hp["subs"]["CheckpointS"]["keep"] == 3


# ----- OnExceptionCheckpoint: the state before the cleanups, resumed exactly, or refused --------------


@pytest.fixture(scope="module")
def uninterrupted():
    learn, metrics = make()
    torch.manual_seed(123)
    learn.fit(EPOCHS)
    return learn.model.state_dict(), metrics.history


@pytest.mark.parametrize("event, resumes", [("before_batch", True), ("after_loss", True), ("after_backward", False)])
def test_on_exception_checkpoint_resumes_exactly_or_is_refused(tmp_path, uninterrupted, event, resumes):
    """A failure at training batch 3 of epoch 1 (Dropout: the RNG is state; MomentumLearner: the
    gradients are): before the batch's backward, the file resumes to the uninterrupted run's
    weights and rows; after it, a resume is refused naming where the file was taken."""
    learn, _ = make(StopAt(1, 3, RuntimeError, event=event), resumable=True)
    torch.manual_seed(123)
    with pytest.raises(RuntimeError):
        quiet(learn.fit, EPOCHS, engine="lightning", callbacks=[OnExceptionCheckpoint(tmp_path)])
    path = tmp_path / "on_exception.ckpt"
    learn, metrics = make(resumable=True)
    with pytest.raises(ValueError, match="Lightning would resume from it"):  # not asked: refused, not resumed
        quiet(learn.fit, EPOCHS, engine="lightning", callbacks=[OnExceptionCheckpoint(tmp_path)])
    torch.manual_seed(999)
    if resumes:
        quiet(learn.fit, EPOCHS, engine="lightning", resume=path)
        assert_same(learn, metrics, uninterrupted)
    else:
        with pytest.raises(ValueError, match=r"inside training batch 3 of epoch 1, after its backward.*CheckpointS"):
            quiet(learn.fit, EPOCHS, engine="lightning", resume=path)
        assert learn.global_step == 0 and learn.engine.name == "native"


# ----- what a run shows ---------------------------------------------------------------------------


def test_what_was_asked_for_shows_and_unactionable_warnings_do_not(tmp_path, caplog):
    import logging

    learn, _ = adam_learner(TensorBoardS(tmp_path))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        learn.fit(1, engine="lightning", callbacks=[ModelSummary()], profiler="simple")
    assert "Total params" in caplog.text and "Profiler Report" in caplog.text  # asked for: shown
    assert "GPU available" not in caplog.text  # Lightning's banner: only with verbose=True
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "LeafSpec" in m or "log_every_n_steps" in m], messages


def test_a_lightning_progress_bar_wins_over_progress_s_and_metrics_rows(capfd):
    for display in (MetricsS(), ProgressS(display="text")):
        learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, subs=[MetricsS(), display])
        quiet(learn.fit, 1, engine="lightning", callbacks=[TQDMProgressBar()])
        shown = capfd.readouterr().out
        assert "valid/loss=" in shown  # the epoch values on Lightning's bar
        assert "| valid |" not in shown and "valid_loss" not in shown  # no MetricsS row, no ProgressS table
    quiet(learn.fit, 1, engine="lightning")  # no Lightning bar: ProgressS shows its table
    shown = capfd.readouterr().out
    assert "valid_loss" in shown and "valid/loss=" not in shown


def test_ddp_says_when_it_shuffles_a_training_loader_made_with_shuffle_false():
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from nntrain.adapters.binding import _warn_unshuffled_order

    trainer = SimpleNamespace(_accelerator_connector=SimpleNamespace(use_distributed_sampler=True),
                              is_global_zero=True)
    with pytest.warns(RuntimeWarning, match="DistributedSampler that shuffles.*use_distributed_sampler=False"):
        _warn_unshuffled_order(DataLoader(list(range(8)), batch_size=2), trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_unshuffled_order(DataLoader(list(range(8)), batch_size=2, shuffle=True), trainer)
        trainer._accelerator_connector.use_distributed_sampler = False
        _warn_unshuffled_order(DataLoader(list(range(8)), batch_size=2), trainer)
