"""Lightning features against a bridged learner: each one gives the native numbers, or is refused
before the first batch with a message naming the alternative (the compatibility matrix of docs/lightning.md)."""

from __future__ import annotations

import csv
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BatchSizeFinder,
    LearningRateFinder,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.tuner import Tuner
from torch.utils.data import DataLoader
from torcheval.metrics import MulticlassAccuracy

from nntrain.adapters import LearnerModule, to_lightning, trainer_defaults
from nntrain.learner import Learner, MomentumLearner
from nntrain.subscribers.metrics import MetricsS
from nntrain.subscribers.tensorboard import TensorBoardS
from tests.helpers import Recorder, tiny_data, tiny_dls, tiny_model

CPU = torch.device("cpu")


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def learner(cls=Learner, **kw):
    metrics = MetricsS(accuracy=MulticlassAccuracy())
    learn = cls(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, subs=[metrics], **kw)
    return learn, metrics


def own_trainer(learn, **options):
    module, callbacks = to_lightning(learn)
    extra = options.pop("callbacks", [])
    return L.Trainer(callbacks=[*callbacks, *extra], **{**trainer_defaults(CPU), **options}), module


# ----- works, with the native numbers -------------------------------------------------------------


def test_trainer_validate_equals_a_native_validation_pass():
    native, nm = learner()
    native.fit(1, train=False)
    learn, metrics = learner()
    trainer, module = own_trainer(learn)
    results = quiet(trainer.validate, module, verbose=False)
    assert metrics.history == nm.history and [r["mode"] for r in metrics.history] == ["valid"]
    assert results[0] == {"valid/loss": pytest.approx(nm.last["loss"], abs=0),
                          "valid/accuracy": pytest.approx(nm.last["accuracy"], abs=0)}
    assert learn.evaluate() == {"valid/loss": nm.last["loss"], "valid/accuracy": nm.last["accuracy"]}
    bridged, bm = learner()
    quiet(bridged.fit, 1, train=False, engine="lightning")  # one training batch loaded, no step
    assert bm.history == nm.history and bridged.global_step == 0


def test_trainer_test_and_learn_evaluate_give_the_same_test_row():
    dl = DataLoader(tiny_data(40, seed=9), batch_size=16)
    native, nm = learner()
    values = native.evaluate(dl)
    assert set(values) == {"test/loss", "test/accuracy"} and nm.last["mode"] == "test"
    learn, metrics = learner()
    trainer, module = own_trainer(learn)
    results = quiet(trainer.test, module, dataloaders=dl, verbose=False)
    assert results[0] == values and metrics.history == nm.history
    assert quiet(learn.evaluate, dl, engine="lightning") == values


def test_trainer_predict_and_get_preds_agree():
    learn, _ = learner()
    preds, targets = learn.get_preds()
    assert preds.shape == (32, 3) and torch.equal(targets, torch.cat([y for _, y in learn.dls.valid]))
    trainer, module = own_trainer(learn)
    batches = quiet(trainer.predict, module, dataloaders=learn.dls.valid)
    assert torch.equal(torch.cat([p for p, _ in batches]), preds)
    lp, lt = quiet(learn.get_preds, engine="lightning")
    assert torch.equal(lp, preds) and torch.equal(lt, targets)


def test_validate_with_a_checkpoint_leaves_no_pending_resume(tmp_path):
    learn, _ = learner()
    quiet(learn.fit, 1, engine="lightning", callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="m")])
    assert learn.global_step == 6
    other, metrics = learner()
    trainer, module = own_trainer(other)
    quiet(trainer.validate, module, ckpt_path=tmp_path / "m.ckpt", verbose=False)
    assert other.resume_plan is None and other.global_step == 0
    assert torch.equal(other.model[0].weight, learn.model[0].weight)  # the weights were loaded
    torch.manual_seed(1)
    other.fit(1)
    assert other.global_step == 6  # a plain fit afterwards starts from its own state


def test_other_loggers_get_the_rows_and_the_step_loss_next_to_tensorboard(tmp_path):
    learn, metrics = learner()
    csv_logger = CSVLogger(tmp_path / "csv", name="")
    tb = TensorBoardS(tmp_path / "tb")
    quiet(learn.fit, 2, engine="lightning", subs=[tb], logger=[csv_logger, _tb_logger(tmp_path / "tb")],
          log_every_n_steps=2)
    rows = list(csv.DictReader(open(csv_logger.log_dir + "/metrics.csv")))
    valid = [float(r["valid/loss"]) for r in rows if r.get("valid/loss")]
    assert valid == pytest.approx([r["loss"] for r in metrics.rows("valid")], abs=1e-6)
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert steps == [2, 4, 6, 8, 10, 12]  # every log_every_n_steps optimizer steps
    assert tb.log_dir is not None and tb.log_dir.parent == tmp_path / "tb"


def _tb_logger(root):
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(root), name="", default_hp_metric=False)


class AutocastLearner(MomentumLearner):
    """The native reference for 16-mixed: forward and loss under fp16 autocast (a scaler only
    multiplies by powers of two)."""

    def predict(self):
        with torch.autocast("cpu", dtype=torch.float16):
            super().predict()

    def get_loss(self):
        with torch.autocast("cpu", dtype=torch.float16):
            super().get_loss()


class GradNorms:
    def __init__(self):
        self.norms = []

    def after_backward(self, learn):
        self.norms.append(torch.cat([p.grad.flatten() for p in learn.model.parameters()]).norm())


def test_fp16_with_a_grad_scaler_shows_unscaled_gradients_and_keeps_momentum():
    torch.manual_seed(0)
    native, nm = learner(AutocastLearner)
    n_norms = GradNorms()
    native.fit(2, subs=[n_norms])
    torch.manual_seed(0)
    learn, metrics = learner(AutocastLearner)
    norms = GradNorms()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    quiet(learn.fit, 2, engine="lightning", subs=[norms], plugins=[plugin])
    # Scaling changes only fp16 rounding inside backward (fewer underflows), so equal to ~1e-6,
    # not bitwise; without the fix the norms were ~1e4x larger and momentum was lost.
    assert torch.allclose(torch.stack(norms.norms), torch.stack(n_norms.norms), rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(learn.model.parameters(), native.model.parameters()))
    assert [r["loss"] for r in metrics.history] == pytest.approx([r["loss"] for r in nm.history], abs=1e-5)


@pytest.mark.parametrize("callback", [ModelCheckpoint, TQDMProgressBar, LearningRateMonitor])
def test_callbacks_that_need_a_flag_or_a_logger_get_it(callback, tmp_path):
    learn, metrics = learner()
    native, nm = learner()
    torch.manual_seed(3)
    native.fit(1)
    torch.manual_seed(3)
    cb = callback(dirpath=tmp_path) if callback is ModelCheckpoint else callback()
    quiet(learn.fit, 1, engine="lightning", callbacks=[cb], default_root_dir=tmp_path)
    assert metrics.history == nm.history
    if callback is ModelCheckpoint:
        assert list(tmp_path.glob("*.ckpt"))


class Plain:
    """A subscriber that is no Subscriber: just methods named after events."""

    def __init__(self):
        self.seen = []

    def after_epoch(self, learn):
        self.seen.append((learn.epoch, learn.mode))


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_any_object_with_event_methods_is_a_subscriber(engine):
    learn, _ = learner()
    plain = Plain()
    quiet(learn.fit, 2, subs=[plain], engine=engine)
    assert plain.seen == [(0, "train"), (0, "valid"), (1, "train"), (1, "valid")]


@pytest.mark.parametrize("engine", ["native", "lightning"])
@pytest.mark.parametrize("make_batch", [lambda x, y: {"x": x, "y": y}, lambda x, y: x])
def test_batches_that_are_not_pairs_get_the_same_clear_error(engine, make_batch):
    data = tiny_data(32)
    loader = DataLoader(data, batch_size=16, collate_fn=lambda items: make_batch(
        torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])))
    learn = Learner(tiny_model(), type("D", (), {"train": loader, "valid": loader})(), F.cross_entropy)
    with pytest.raises(TypeError, match=r"a batch must be a pair \(inputs, targets\)"):
        quiet(learn.fit, 1, engine=engine)


# ----- refused before the first batch, naming the alternative ---------------------------------------


@pytest.mark.parametrize("options, match", [
    (dict(val_check_interval=0.5), "val_check_interval.*limit_train_batches"),
    (dict(callbacks=[LearningRateFinder()]), "learn.lr_find"),
    (dict(callbacks=[BatchSizeFinder()]), "batch_size"),
    (dict(callbacks=[StochasticWeightAveraging(swa_lrs=0.01)]), "AveragedModel"),
    (dict(callbacks=[BackboneFinetuning()]), "requires_grad_"),
])
def test_refused_before_the_first_batch(options, match):
    rec = Recorder()
    learn, metrics = learner()
    weights = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match=match):
        quiet(learn.fit, 1, engine="lightning", subs=[rec], **options)
    assert rec.trace == [] and metrics.history == [] and learn.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, learn.model.parameters()))
    assert learn.engine.name == "native"


def test_tuner_lr_find_is_refused_and_the_learner_is_unchanged():
    learn, metrics = learner()
    trainer, module = own_trainer(learn)
    with pytest.raises(ValueError, match=r"learn\.lr_find\(engine='lightning'\)"):
        quiet(Tuner(trainer).lr_find, module)
    assert learn.global_step == 0 and metrics.history == [] and learn.engine.name == "native"


class ScheduledModule(LearnerModule):
    def configure_optimizers(self):
        opt = super().configure_optimizers()
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]


def test_a_scheduler_from_configure_optimizers_is_refused_before_the_first_batch():
    rec = Recorder()
    learn, metrics = learner()
    learn.add_subs([rec])
    module, callbacks = to_lightning(learn)
    module = ScheduledModule(learn)
    callbacks[0].module = module
    trainer = L.Trainer(max_epochs=1, callbacks=callbacks, **trainer_defaults(CPU))
    with pytest.raises(ValueError, match="LR schedulers.*SchedulerS"):
        quiet(trainer.fit, module)
    assert not [e for e in rec.trace if e[0] == "before_batch"] and learn.global_step == 0


def test_a_default_lightning_fit_prints_no_warning_caused_by_the_bridge():
    learn, _ = learner()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learn.fit(1, engine="lightning")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "logger" in m or "eval mode" in m], messages


@pytest.mark.parametrize("verbose", [False, True])
def test_lightning_info_lines_only_with_verbose(verbose, caplog):
    import logging

    learn, _ = learner()
    level = logging.getLogger("lightning.pytorch").level
    with caplog.at_level(logging.INFO):
        quiet(learn.fit, 1, engine="lightning", verbose=verbose)
    banner = [r for r in caplog.records if "GPU available" in r.getMessage() or "stopped" in r.getMessage()]
    assert bool(banner) == verbose
    assert logging.getLogger("lightning.pytorch").level == level  # put back
