"""`assert_engines_agree` passes on agreeing engines and names the first difference otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nntrain import CancelBatchException, Learner, MetricsS, Subscriber
from nntrain.testing import assert_engines_agree
from tests.helpers import tiny_dls, tiny_model


class OnLightning(Subscriber):
    """Misbehaves under Lightning only (what the check is for): `what` says how."""

    def __init__(self, what):
        self.what = what

    def _lightning(self, learn):
        return learn.engine.name == "lightning"

    def before_backward(self, learn):
        if self.what == "loss" and self._lightning(learn) and learn.iter == 2:
            learn.loss_grad = learn.loss_grad * 2

    def before_batch(self, learn):
        if self.what == "trace" and self._lightning(learn) and (learn.epoch, learn.iter) == (1, 3):
            raise CancelBatchException()

    def after_fit(self, learn):
        if self.what == "weights" and self._lightning(learn):
            with torch.no_grad():
                learn.model[2].bias.add_(1e-7)


def make(what=None):
    def make_learner():
        m = MetricsS()
        m.output = lambda row: None
        return Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1,
                       subs=[m] + ([OnLightning(what)] if what else []))
    return make_learner


def test_agreeing_engines_pass_and_both_runs_come_back():
    native, light = assert_engines_agree(make(), epochs=2)
    assert native.engine == "native" and light.engine == "lightning"
    assert len(native.trace.losses) == 12 and native.learn.global_step == light.learn.global_step == 12
    assert native.rows and native.rows == light.rows


@pytest.mark.parametrize("what, message", [
    ("loss", r"training loss differs at epoch 0, batch 3"),  # the doubled gradient shows in the next loss
    ("trace", r"event traces differ at event #\d+: native \('after_predict', 'train', 1, 3\) vs lightning "
              r"\('cleanup_batch', 'train', 1, 3\)"),
    ("weights", r"final weights differ in '2.bias'"),
])
def test_a_difference_is_named(what, message):
    with pytest.raises(AssertionError, match=message):
        assert_engines_agree(make(what), epochs=2)


def test_make_learner_must_build_a_learner():
    with pytest.raises(TypeError, match="must return a Learner"):
        assert_engines_agree(lambda: object())
