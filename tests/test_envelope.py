"""The envelope `fit`, `evaluate` and `get_preds` share on every engine: after it the learner holds
no autograd graph (so it pickles, as `strategy="ddp_spawn"` needs), also after an error."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from nntrain.learner import Learner, Subscriber
from tests.helpers import tiny_dls, tiny_model


def graphs(obj, seen=None):
    """The tensors with a `grad_fn` reachable from `obj`'s attributes (through containers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.grad_fn is not None else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in graphs(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in graphs(v, seen)]
    return []


def held_graphs(learn):
    return {name: found for name, value in vars(learn).items() if (found := graphs(value))}


class FailAt(Subscriber):
    """Raises in `after_backward` of the second training batch: a graph is alive at that point."""

    def after_backward(self, learn):
        if learn.iter == 1:
            raise RuntimeError("boom")


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_no_learner_attribute_holds_a_graph_after_a_fit_or_an_error(engine):
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy)
    learn.fit(1, engine=engine)
    assert held_graphs(learn) == {}
    assert learn.loss is not None and learn.loss.grad_fn is None  # kept, detached
    pickle.dumps(learn)  # what ddp_spawn does with the module; a graph would refuse ("non-leaf tensor")
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(1, engine=engine, subs=[FailAt()])
    assert held_graphs(learn) == {}
