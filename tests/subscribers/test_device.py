"""DeviceS and to_device: model, optimizer state and batches land on the device."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

from nntrain.learner import Learner, Subscriber
from nntrain.subscribers.device import DeviceS, default_device, to_device
from tests.helpers import tiny_dls, tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class BatchDevices(Subscriber):
    """Records the batch's container type and tensor devices after the step's forward pass."""

    def __init__(self) -> None:
        self.seen: list[tuple[type, tuple[str, ...]]] = []

    def after_predict(self, learn) -> None:
        self.seen.append((type(learn.batch), tuple(t.device.type for t in learn.batch)))


def test_auto_and_explicit_devices():
    assert DeviceS("auto").device == default_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert DeviceS().device == default_device()
    sub = DeviceS(torch.device("cpu"))
    assert sub.device == torch.device("cpu") and sub.non_blocking is False
    assert DeviceS("cuda:1").device == torch.device("cuda", 1)
    assert DeviceS.engines == ("native",)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_moves_model_and_batches(device):
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy)
    params = list(learn.model.parameters())
    probe = BatchDevices()
    learn.fit(1, subs=[DeviceS(device), probe])
    assert all(p.device.type == device for p in learn.model.parameters())
    assert list(learn.model.parameters()) == params  # moved in place: the optimizer still holds them
    assert learn.opt.param_groups[0]["params"][0] is params[0]
    assert len(probe.seen) == 6 + 2
    assert all(kind is list and devices == (device, device) for kind, devices in probe.seen)


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_state_follows_the_model(device):
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, optim_class=torch.optim.Adam, lr=1e-3)
    learn.fit(1, valid=False)
    before = {k: v.clone() for k, v in learn.opt.state[next(learn.model.parameters())].items()}
    DeviceS(device).before_fit(learn)
    param = next(learn.model.parameters())
    state = learn.opt.state[param]
    assert state["exp_avg"].device == param.device and state["exp_avg_sq"].device == param.device
    assert state["step"].device.type == "cpu"  # torch keeps a non-capturable Adam's step on the host
    for name, value in before.items():
        torch.testing.assert_close(state[name].cpu(), value)
    learn.fit(1, valid=False, subs=[DeviceS(device)])  # and training goes on


def test_to_device_keeps_structure():
    Pair = namedtuple("Pair", "x y")
    x, y = torch.zeros(2), torch.ones(2)
    cpu = torch.device("cpu")
    assert to_device([x, y], cpu)[1] is y and isinstance(to_device([x, y], cpu), list)
    moved = to_device({"x": x, "meta": ("id", 3), "pair": Pair(x, y)}, cpu)
    assert moved["meta"] == ("id", 3)
    assert isinstance(moved["pair"], Pair) and moved["pair"].y is y
    assert to_device("text", cpu) == "text"


def test_dict_batch_is_moved():
    class DictBatch(Subscriber):
        order = -20  # before DeviceS

        def before_batch(self, learn):
            learn.batch = {"x": learn.batch[0], 1: learn.batch[1]}

    seen = []

    class Check(Subscriber):
        def before_batch(self, learn):
            seen.append({k: v.device.type for k, v in learn.batch.items()})
            learn.batch = (learn.batch["x"], learn.batch[1])

    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy)
    learn.fit(1, valid=False, subs=[DictBatch(), DeviceS("cpu"), Check()])
    assert seen and all(s == {"x": "cpu", 1: "cpu"} for s in seen)


# ----- the learner's own placement: the GPU by default --------------------------------------------


def test_the_learner_places_itself_on_the_default_device_unless_told_otherwise():
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy)
    assert learn.device == default_device()
    placed = learn.placement()
    if default_device().type == "cpu":
        assert placed == []  # everything is on the CPU already: no per-batch work
    else:
        assert [type(s) for s in placed] == [DeviceS] and placed[0].device == default_device()
    wanted = Learner(tiny_model(), tiny_dls(), F.cross_entropy, device="cuda:1")
    assert [(type(s), s.device) for s in wanted.placement()] == [(DeviceS, torch.device("cuda:1"))]
    assert wanted.placement([DeviceS("cpu")]) == []  # an attached DeviceS decides
    assert Learner(tiny_model(), tiny_dls(), F.cross_entropy, device=None).placement() == []
    with pytest.raises(ValueError, match="device must be 'auto'.*'gpu0'"):
        Learner(tiny_model(), tiny_dls(), F.cross_entropy, device="gpu0")


def test_a_model_on_another_device_than_its_inputs_is_named_in_the_error():
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, device=None)
    learn.model.to("meta")
    with pytest.raises(Exception) as info:
        learn.fit(1)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "device cpu" in notes and "the model is on meta and the inputs on cpu" in notes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_a_default_learner_trains_on_cuda_on_both_engines(engine):
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, subs=[BatchDevices()])
    learn.fit(1, engine=engine)
    assert next(learn.model.parameters()).device.type == "cuda"
    assert {devices for _, devices in learn.subs[0].seen} == {("cuda", "cuda")}
