"""fastai's everyday verbs: parameter groups, `freeze` / `unfreeze`, discriminative lrs
(`lr=slice(lo, hi)`), `fine_tune`, `summary`, `export` / `load_learner`, `to_fp16` / `to_bf16`;
each the same on both engines where it trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain import CheckpointError, Learner, MixedPrecisionS, load_learner
from nntrain.freeze import body_head, param_groups
from nntrain.optim import check_lr_range, lr_range
from nntrain.testing import assert_engines_agree
from tests.helpers import BasicOptim, tiny_dls, tiny_model


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def make_learner(model=None, optim_class=torch.optim.SGD, **kwargs) -> Learner:
    return Learner(model if model is not None else tiny_model(), tiny_dls(shuffle=False), F.cross_entropy,
                   optim_class, 0.1, **kwargs)


class Cycles:
    """Records, at each fit's start, the one-cycle's peak lr of every param group and which
    parameters train."""

    order = 100  # after SchedulerS made the cycle

    def __init__(self) -> None:
        self.fits: list[tuple[list[float], list[bool]]] = []

    def before_fit(self, learn) -> None:
        self.fits.append((learn.scheduler.sched.lr_maxes, [p.requires_grad for p in learn.model.parameters()]))


# ----- parameter groups and lrs ----------------------------------------------------------------


def test_lr_range_spreads_a_slice_over_the_groups_as_fastai():
    assert lr_range(0.1, 3) == [0.1] * 3
    assert lr_range(slice(1e-2), 3) == [1e-3, 1e-3, 1e-2]  # slice(hi): hi / 10 below the head
    assert lr_range(slice(1e-4, 1e-2), 3) == pytest.approx([1e-4, 1e-3, 1e-2])  # even on a log scale
    assert lr_range(slice(1e-4, 1e-2), 1) == [1e-2]
    for bad in (slice(1e-2, 1e-4), slice(0, 1e-2), slice(1e-4, 1e-2, 2), slice(None), "0.1", -1.0, math.nan):
        with pytest.raises(ValueError, match="slice"):
            check_lr_range(bad)


def test_default_splitter_takes_the_last_child_as_the_head_and_checks_a_given_one():
    model = tiny_model()
    body, head = body_head(model)
    assert body == list(model[0].parameters()) and head == list(model[2].parameters())
    with pytest.raises(ValueError, match="splitter="):
        body_head(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"left out 2 parameter\(s\) \(2.weight, 2.bias\)"):
        param_groups(model, lambda m: [m[0]])
    with pytest.raises(ValueError, match="'0.weight' is in groups 0 and 1"):
        param_groups(model, lambda m: [m[0], m])
    with pytest.raises(TypeError, match="list of groups"):
        param_groups(model, lambda m: m)
    assert param_groups(model, lambda m: [m[:2], m[2]]) == [body, head]  # modules or parameter lists


def test_a_slice_gives_each_group_its_lr_and_regroups_a_made_optimizer_keeping_its_state():
    learn = make_learner(optim_class=torch.optim.Adam)
    learn.fit(1, valid=False)
    assert len(learn.opt.param_groups) == 1
    state = {p: learn.opt.state[p] for p in learn.model.parameters()}
    betas = learn.opt.param_groups[0]["betas"] = (0.8, 0.99)  # a hyper-parameter set on the group is kept
    learn.fit(1, valid=False, lr=slice(1e-4, 1e-2))
    assert [g["lr"] for g in learn.opt.param_groups] == [1e-4, 1e-2] and learn.lr == slice(1e-4, 1e-2)
    assert all(g["betas"] == betas for g in learn.opt.param_groups)
    assert all(learn.opt.state[p] is state[p] for p in learn.model.parameters())
    assert all(int(learn.opt.state[p]["step"]) == 12 for p in learn.model.parameters())  # 6 + 6 steps
    learn.fit(1, valid=False, lr=0.05)  # a number: every group, no new optimizer
    assert [g["lr"] for g in learn.opt.param_groups] == [0.05, 0.05]


def test_a_slice_needs_an_optimizer_with_param_groups():
    with pytest.raises(TypeError, match="torch.optim"):
        make_learner(optim_class=BasicOptim).fit(1, lr=slice(1e-3, 1e-1))
    learn = make_learner(optim_class=BasicOptim)
    learn.fit(1, valid=False)
    with pytest.raises(TypeError, match="param_groups|parameter groups"):
        learn.fit(1, lr=slice(1e-3, 1e-1))


# ----- freeze, fine_tune: the same on both engines ---------------------------------------------


def test_freeze_trains_the_head_only_and_unfreeze_everything():
    learn = make_learner(bn_model())
    learn.freeze()
    trains = {name: p.requires_grad for name, p in learn.model.named_parameters()}
    assert trains == {"0.weight": False, "0.bias": False, "1.weight": True, "1.bias": True,  # train_bn, as fastai
                      "3.weight": True, "3.bias": True}
    frozen = learn.model[0].weight.detach().clone()
    learn.fit(1, valid=False)
    assert torch.equal(learn.model[0].weight, frozen) and learn.model[0].weight.grad is None
    learn.freeze(train_bn=False)
    assert not learn.model[1].weight.requires_grad
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())
    with pytest.raises(ValueError, match="n must be an int from -2 to 2"):
        learn.freeze_to(3)


def test_fine_tune_is_fastais_recipe_and_the_engines_agree():
    cycles = Cycles()

    def fine_tune(learn, epochs, **kw):
        return learn.fine_tune(epochs, base_lr=1e-2, subs=[*kw.pop("subs"), cycles], **kw)

    native, light = assert_engines_agree(lambda: make_learner(bn_model()), epochs=1, fit=fine_tune)
    frozen, unfrozen = cycles.fits[:2]  # native's two fits
    assert frozen == ([1e-3, 1e-2], [False, False, True, True, True, True])  # slice(base_lr); the head and BN train
    assert unfrozen[0] == pytest.approx([5e-5, 5e-3]) and all(unfrozen[1])  # slice(base_lr / 2 / lr_mult, base_lr / 2)
    assert cycles.fits[2:] == cycles.fits[:2]  # lightning's
    assert native.learn.global_step == 12


def test_a_frozen_fit_with_discriminative_lrs_is_the_same_on_both_engines():
    def make():
        learn = make_learner(optim_class=torch.optim.AdamW)
        learn.freeze_to(1, splitter=lambda m: [m[0], m[2]])
        return learn

    native, _ = assert_engines_agree(make, epochs=1, lr=slice(1e-3, 1e-2))
    assert torch.equal(native.learn.model[0].weight, make().model[0].weight)  # frozen: not even weight decay
    assert [g["lr"] for g in native.learn.opt.param_groups] == [1e-3, 1e-2]


# ----- summary -----------------------------------------------------------------------------------


def test_summary_lists_layers_shapes_counts_and_what_trains_without_changing_anything():
    learn = make_learner(bn_model())
    learn.freeze()
    learn.model.train()
    rng = torch.get_rng_state()
    summary = learn.summary()
    assert torch.equal(torch.get_rng_state(), rng) and learn.model.training
    assert [(r.name, r.kind, r.output, r.params, r.trainable) for r in summary.rows] == [
        ("0", "Linear", "16 x 16", 144, "no"), ("1", "BatchNorm1d", "16 x 16", 32, "yes"),
        ("2", "ReLU", "16 x 16", 0, ""), ("3", "Linear", "16 x 3", 51, "yes")]
    assert (summary.total, summary.trainable, summary.frozen) == (227, 83, 144)
    text = str(summary)
    assert text.startswith("Sequential (input: 16 x 8)") and "Frozen params: 144" in text
    assert "Frozen: the first 1 of 2 parameter groups" in text and repr(summary) == text
    assert learn.summary(torch.zeros(2, 8)).rows[0].output == "2 x 16"  # the inputs alone


# ----- export and load_learner -------------------------------------------------------------------


class InferLearner(Learner):
    """A learner whose `call_model` an export must keep."""

    def call_model(self, inputs):
        return super().call_model(inputs).softmax(-1)


def test_export_and_load_learner_safely_or_trusted(tmp_path):
    learn = InferLearner(bn_model(), tiny_dls(), F.cross_entropy)
    learn.fit(1)
    learn.freeze()
    path = learn.export(tmp_path / "model.pt")
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"model=Sequential\(\.\.\.\).*trusted=True"):
        load_learner(path)  # the default reads no pickle
    safe = load_learner(path, model=bn_model(seed=1), learner_class=InferLearner)
    assert torch.equal(safe.infer(x), learn.infer(x))
    trusted = load_learner(path, trusted=True)
    assert type(trusted) is InferLearner and trusted.loss_fn is F.cross_entropy
    assert torch.equal(trusted.infer(x), learn.infer(x))
    assert torch.equal(trusted.model[1].running_mean, learn.model[1].running_mean)  # buffers too
    assert [p.requires_grad for p in trusted.model.parameters()] == [p.requires_grad for p in learn.model.parameters()]
    with pytest.raises(ValueError, match="no data: set learn.dls"):
        trusted.fit(1)
    with pytest.raises(ValueError, match="does not fit the weights"):
        load_learner(path, model=tiny_model())
    learn.save(tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a file Learner.export wrote"):
        load_learner(tmp_path / "weights.pt")
    lam = Learner(tiny_model(), tiny_dls(), lambda p, y: F.cross_entropy(p, y))  # an unpicklable loss
    with pytest.raises(ValueError, match="loss_fn="):
        load_learner(lam.export(tmp_path / "lam.pt"), trusted=True).loss_fn(None, None)


# ----- precision -----------------------------------------------------------------------------------


def test_to_fp16_and_to_bf16_attach_one_mixed_precision_subscriber_and_return_the_learner():
    learn = make_learner()
    assert learn.to_fp16() is learn
    assert learn.to_bf16() is learn
    (sub,) = [s for s in learn.subs if isinstance(s, MixedPrecisionS)]
    assert sub.dtype is torch.bfloat16
    assert learn.to_fp32() is learn and not learn.subs


def test_to_bf16_trains_the_same_on_both_engines():
    assert_engines_agree(lambda: make_learner().to_bf16(), epochs=1)
