"""The fast path: device-resident loaders, and a compiled step that gives the eager step's losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.data import DataLoaders, digits_dataset_dict
from nntrain.fastpath import CompiledLearner, DeviceDataLoader, to_device_loaders
from nntrain.learner import MomentumLearner
from tests.helpers import Recorder


def test_device_loader_shuffles_every_sample_once_per_epoch_reproducibly():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    dl = DeviceDataLoader(x, y, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert len(dl) == 3 and len(DeviceDataLoader(x, y, 4, drop_last=True)) == 2
    epoch1, epoch2 = [torch.cat([b[1] for b in dl]) for _ in range(2)]
    assert sorted(epoch1.tolist()) == list(range(10)) and not torch.equal(epoch1, epoch2)
    for xb, yb in dl:
        assert torch.equal(xb[:, 0].long(), yb)  # inputs and targets stay paired
    again = DeviceDataLoader(x, y, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([b[1] for b in again]), epoch1)
    assert [b[1].tolist() for b in DeviceDataLoader(x, y, 4, shuffle=False)][0] == [0, 1, 2, 3]


def test_device_loader_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        DeviceDataLoader(torch.zeros(3, 1), torch.zeros(2), 2)
    with pytest.raises(TypeError, match="TensorPairDataset"):
        to_device_loaders(DataLoaders([1], [2]), "cpu")


class FastMomentum(CompiledLearner, MomentumLearner):
    """The compiled step with MomentumLearner's zero_grad."""


def test_compiled_step_gives_the_eager_losses_and_events():
    dls = to_device_loaders(DataLoaders.from_hf_dd(digits_dataset_dict(), batch_size=64), "cpu")
    assert len(dls.train) == 1438 // 64  # drop_last: one batch shape, one graph

    def run(cls, **kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 10))
        rec = Recorder()
        learn = cls(model, dls, F.cross_entropy, torch.optim.SGD, 0.05, [rec], mom=0.85, **kw)
        torch.manual_seed(1)
        learn.fit(2)
        return rec, model

    eager, eager_model = run(MomentumLearner)
    fast, fast_model = run(FastMomentum, mode="default")
    assert len(fast.losses) == 2 * 22
    torch.testing.assert_close(torch.stack(fast.losses), torch.stack(eager.losses), atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert [e for e, *_ in fast.trace] == [e for e, *_ in eager.trace]
