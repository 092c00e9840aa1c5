"""Native and Lightning fits give bitwise-equal losses and weights; the bridge rejects what it cannot do."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.adapters import HOOK_TABLE, LearnerCallback, LearnerModule, to_lightning
from nntrain.learner import Learner, MomentumLearner, Subscriber
from nntrain.testing import assert_engines_agree
from tests.helpers import Recorder, tiny_dls, tiny_model


def bn_dropout_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def run(engine: str, cls=Learner, make_model=tiny_model, optim=torch.optim.SGD, **kw):
    model = make_model()
    rec = Recorder()
    learn = cls(model, tiny_dls(), F.cross_entropy, optim, lr=0.1, subs=[rec], **kw)
    torch.manual_seed(123)  # data order and dropout draw from the global generator
    learn.fit(3, engine=engine)
    return learn, rec


CASES = {
    "sgd": dict(),
    "momentum_learner": dict(cls=MomentumLearner, mom=0.85),
    "batchnorm_dropout": dict(make_model=bn_dropout_model),
    "adam": dict(optim=torch.optim.Adam),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_weights_and_trace_are_bitwise_equal(case):
    kw = dict(CASES[case])
    cls, make_model, optim = kw.pop("cls", Learner), kw.pop("make_model", tiny_model), kw.pop("optim", torch.optim.SGD)
    native, light = assert_engines_agree(
        lambda: cls(make_model(), tiny_dls(), F.cross_entropy, optim, lr=0.1, **kw), epochs=3, seed=123)
    assert len(native.trace.losses) == 3 * 6 and native.learn.global_step == 18


def test_model_and_optimizer_are_the_learners_after_a_lightning_fit():
    model = tiny_model()
    learn = Learner(model, tiny_dls(), F.cross_entropy, torch.optim.Adam, lr=1e-2)
    learn.fit(1, engine="lightning")
    opt = learn.opt
    assert learn.model is model and type(opt) is torch.optim.Adam and len(opt.state) == len(list(model.parameters()))
    learn.fit(1)  # a native fit continues with the same optimizer and its state
    assert learn.opt is opt and next(iter(opt.state.values()))["step"] == 12


@pytest.mark.parametrize("cls, optim", [(Learner, torch.optim.Adam), (MomentumLearner, torch.optim.SGD)])
def test_native_then_lightning_continues_like_two_native_fits(cls, optim):
    """Optimizer state and the gradients MomentumLearner keeps carry over to a Lightning fit."""
    def two_fits(second):
        learn = cls(tiny_model(), tiny_dls(), F.cross_entropy, optim, lr=1e-2)
        torch.manual_seed(5)
        learn.fit(1)
        learn.fit(1, engine=second)
        return learn.model.state_dict()
    a, b = two_fits("native"), two_fits("lightning")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_own_trainer_with_bridged_callbacks():
    rec = Recorder()
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, subs=[rec])
    module, callbacks = to_lightning(learn)
    assert isinstance(module, LearnerModule) and [type(c) for c in callbacks] == [LearnerCallback]
    torch.manual_seed(123)
    trainer = L.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module)
    native, rec_n = run("native")
    assert rec.trace == rec_n.trace
    assert all(torch.equal(a, b) for a, b in zip(learn.model.parameters(), native.model.parameters()))


def test_hook_table_names_real_hooks_and_each_is_overridden():
    """Every row of HOOK_TABLE is a Lightning Callback hook that LearnerCallback overrides, and
    every action it names exists."""
    for hook, actions in HOOK_TABLE.items():
        assert hasattr(L.Callback, hook), hook
        assert getattr(LearnerCallback, hook) is not getattr(L.Callback, hook), hook
        for action in actions:
            assert callable(getattr(LearnerCallback, f"_{action[0]}", None)), (hook, action)


@pytest.mark.parametrize("option", ["max_epochs"])
def test_unsupported_trainer_options_fail_before_training(option):
    rec = Recorder()
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, subs=[rec])
    with pytest.raises(ValueError, match=option):
        learn.fit(1, engine="lightning", **{option: 2})
    assert rec.trace == []


class NativeOnly(Subscriber):
    engines = ("native",)

    def before_fit(self, learn):
        pass


def test_native_only_subscriber_is_rejected_before_training():
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, subs=[NativeOnly()])
    with pytest.raises(ValueError, match="NativeOnly.*engine='native'"):
        learn.fit(1, engine="lightning")


def test_model_that_is_not_a_module_is_rejected():
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy)
    learn.model = lambda x: x
    with pytest.raises(TypeError, match="nn.Module"):
        learn.fit(1, engine="lightning")


def metrics_run(engine):
    from torcheval.metrics import MulticlassAccuracy
    from torchmetrics.classification import MulticlassAccuracy as TMAccuracy

    from nntrain.subscribers.metrics import MetricsS, batch_accuracy

    metrics = MetricsS(acc_torcheval=MulticlassAccuracy(), acc_torchmetrics=TMAccuracy(num_classes=3, average="micro"),
                       acc_fn=batch_accuracy, flush_every=2)
    learn = Learner(bn_dropout_model(), tiny_dls(), F.cross_entropy, lr=0.1, subs=[metrics])
    torch.manual_seed(123)
    assert learn.fit(2, engine=engine) is None  # the same on both engines; the Trainer is learn.trainer
    return metrics.history, learn.trainer


def test_metrics_values_are_equal_and_logged_under_stable_names():
    native, _ = metrics_run("native")
    light, trainer = metrics_run("lightning")
    assert [(r["epoch"], r["mode"]) for r in native] == [(0, "train"), (0, "valid"), (1, "train"), (1, "valid")]
    assert native == light
    logged = trainer.callback_metrics
    for mode in ("train", "valid"):
        for name in ("loss", "acc_torcheval", "acc_torchmetrics", "acc_fn"):
            assert logged[f"{mode}/{name}"].item() == pytest.approx(light[-1 if mode == "valid" else -2][name])


def test_lightning_early_stopping_monitors_bridged_metrics():
    from lightning.pytorch.callbacks import EarlyStopping

    from nntrain.subscribers.metrics import MetricsS

    metrics = MetricsS()
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.0, subs=[metrics])  # lr 0: loss never improves
    learn.fit(10, engine="lightning", callbacks=[EarlyStopping("valid/loss", patience=1, min_delta=1e-3)])
    assert len(metrics.rows("valid")) == 2  # epoch 0 sets the best, epoch 1 fails to improve: stop


def lr_find_run(engine):
    torch.manual_seed(7)
    learn = Learner(bn_dropout_model(), tiny_dls(n_train=512), F.cross_entropy, lr=0.1)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    finder = learn.lr_find(start_lr=1e-4, mult=1.5, engine=engine)
    after = learn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # model restored
    return finder


def test_lr_finder_records_and_suggests_the_same_on_both_engines():
    native, light = lr_find_run("native"), lr_find_run("lightning")
    assert len(native.lrs) > 5
    assert native.lrs == light.lrs and native.losses == light.losses
    assert native.suggestion() == light.suggestion()
    assert native.suggestion("steepest") == light.suggestion("steepest")


class PredsDtype(Subscriber):
    def after_predict(self, learn):
        self.dtype = learn.preds.dtype


def test_lightning_precision_plugin_applies_to_the_learners_step():
    def losses(precision):
        rec, probe = Recorder(), PredsDtype()
        learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, subs=[rec, probe])
        torch.manual_seed(1)
        learn.fit(2, engine="lightning", precision=precision)
        return torch.stack(rec.losses), probe.dtype
    full, full_dtype = losses("32-true")
    half, half_dtype = losses("bf16-mixed")
    assert (full_dtype, half_dtype) == (torch.float32, torch.bfloat16)  # autocast wraps predict
    assert not torch.equal(full, half)
    torch.testing.assert_close(half, full, atol=2e-2, rtol=0)  # and training still follows fp32


def test_the_docs_hook_table_is_the_code_table():
    """docs/lightning.md shows HOOK_TABLE and STEP_TABLE as `hook_table_markdown()` writes them
    (`python docs/generated.py` rewrites the page's copy)."""
    from pathlib import Path

    from nntrain.adapters import hook_table_markdown

    page = (Path(__file__).resolve().parents[2] / "docs" / "lightning.md").read_text()
    block = page.split("<!-- generated: hook-table -->\n", 1)[1].split("\n<!-- /generated: hook-table -->", 1)[0]
    assert block == hook_table_markdown()
