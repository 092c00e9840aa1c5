"""The seeds' stories on the embedded digits: SGD, then momentum beats it; 3 vs 7 with a 2-layer net."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from nntrain.data import (
    DataLoaders,
    TensorPairDataset,
    digits_dataset_dict,
    pre_batched_collate,
)
from nntrain.learner import Learner, MomentumLearner
from nntrain.subscribers.metrics import MetricsS, batch_accuracy
from tests.helpers import BasicOptim


@pytest.fixture(scope="module")
def digits_dls():
    return DataLoaders.from_hf_dd(digits_dataset_dict(), batch_size=64)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 10))


def final_valid(cls, dls, **kw):
    metrics = MetricsS(accuracy=batch_accuracy)
    learn = cls(mlp(), dls, F.cross_entropy, torch.optim.SGD, 0.05, [metrics], **kw)
    torch.manual_seed(1)
    learn.fit(3)
    return metrics.rows("valid")[-1]


def test_sgd_learns_and_momentum_learner_beats_it(digits_dls, capsys):
    plain = final_valid(Learner, digits_dls)
    momentum = final_valid(MomentumLearner, digits_dls, mom=0.85)
    assert plain["accuracy"] > 0.5  # learns: chance is 0.1
    assert momentum["loss"] < plain["loss"] and momentum["accuracy"] > plain["accuracy"]
    assert "valid" in capsys.readouterr().out  # MetricsS printed its rows


def mnist_loss(predictions, targets):
    """The second seed's loss: 1 - sigmoid for 3s (target 1), sigmoid for 7s."""
    predictions = predictions.sigmoid()
    return torch.where(targets == 1, 1 - predictions, predictions).mean()


def binary_accuracy(preds, targets):
    return ((preds.sigmoid() > 0.5) == targets).float().mean()



def threes_and_sevens(ds: TensorPairDataset) -> TensorPairDataset:
    keep = (ds.y == 3) | (ds.y == 7)
    return TensorPairDataset(ds.x[keep], (ds.y[keep] == 3).float().unsqueeze(1))


def test_three_vs_seven_reaches_97_percent_and_predicts_a_single_image(digits_dls):
    train = threes_and_sevens(digits_dls.train.dataset)
    valid = threes_and_sevens(digits_dls.valid.dataset)
    torch.manual_seed(0)
    dls = DataLoaders(DataLoader(train, batch_size=32, shuffle=True, collate_fn=pre_batched_collate),
                      DataLoader(valid, batch_size=64, collate_fn=pre_batched_collate))
    simple_net = nn.Sequential(nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 1))
    metrics = MetricsS(accuracy=binary_accuracy)
    learn = Learner(simple_net, dls, mnist_loss, BasicOptim, lr=0.5, subs=[metrics])
    learn.fit(20)
    assert metrics.rows("valid")[-1]["accuracy"] >= 0.97
    for label in (1.0, 0.0):  # a 3, then a 7
        i = int((valid.y[:, 0] == label).nonzero()[0])
        out = learn.infer(valid.x[i], single=True)
        assert out.shape == (1,) and (out.sigmoid() > 0.5).item() == bool(label)
