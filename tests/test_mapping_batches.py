"""Hugging Face-style batches: a mapping whose "labels" are the targets and whose other entries
are the model's keyword arguments, on both engines, from `DataLoaders.from_hf_dd` token columns."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torcheval.metrics import MulticlassAccuracy

from nntrain import DataLoaders, Learner, MetricsS
from nntrain.testing import assert_engines_agree

VOCAB, LENGTH = 20, 6


def text_dd(n_train: int = 64, n_valid: int = 32, seed: int = 0) -> datasets.DatasetDict:
    """Token sequences (padded with 0 to LENGTH) labelled by whether token 3 occurs in them."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        lengths = torch.randint(2, LENGTH + 1, (n,), generator=g)
        ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        mask = (torch.arange(LENGTH) < lengths[:, None]).long()
        ids = ids * mask
        labels = ((ids == 3).any(dim=1)).long()
        return datasets.Dataset.from_dict(
            {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "label": labels.tolist()},
            features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                        "attention_mask": datasets.Sequence(datasets.Value("int64")),
                                        "label": datasets.ClassLabel(names=["no", "yes"])}))
    return datasets.DatasetDict({"train": split(n_train), "validation": split(n_valid)})


class TinyTextClassifier(nn.Module):
    """Mean of the token embeddings under the attention mask, then a linear layer."""

    def __init__(self, seed: int = 0, hf_output: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out, self.hf_output = nn.Embedding(VOCAB, 8), nn.Linear(8, 2), hf_output

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.out(pooled)
        return SimpleNamespace(logits=logits) if self.hf_output else logits  # as transformers' ModelOutput


def make(hf_output=False):
    m = MetricsS(accuracy=MulticlassAccuracy())
    m.output = lambda row: None
    return Learner(TinyTextClassifier(hf_output=hf_output), DataLoaders.from_hf_dd(text_dd(), 16), F.cross_entropy,
                   torch.optim.Adam, lr=0.05, subs=[m])


def test_token_columns_become_mapping_batches():
    dls = DataLoaders.from_hf_dd(text_dd(), 16, shuffle=False)
    batch = next(iter(dls.train))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].shape == (16, LENGTH) and batch["labels"].dtype == torch.int64


@pytest.mark.parametrize("hf_output", [False, True])
def test_a_text_classifier_on_mapping_batches_trains_the_same_on_both_engines(hf_output):
    native, _ = assert_engines_agree(lambda: make(hf_output), epochs=3)
    rows = native.rows[0]
    assert rows[-1]["accuracy"] > rows[1]["accuracy"]  # it learns
    learn = native.learn
    preds, targets = learn.get_preds()
    assert preds.shape == (32, 2) and targets.shape == (32,)
    one = {k: v[0] for k, v in next(iter(learn.dls.valid)).items() if k != "labels"}
    assert torch.allclose(learn.infer(one, single=True), preds[0], atol=1e-6)


def test_a_mapping_without_labels_names_the_keys_it_has():
    ds = text_dd()["train"].remove_columns("label").with_format("torch")
    loader = DataLoader(ds, batch_size=16)
    learn = Learner(TinyTextClassifier(), SimpleNamespace(train=loader, valid=loader), F.cross_entropy)
    with pytest.raises(TypeError, match=r"targets under 'labels' or 'label'; its keys: \['attention_mask', 'input_ids'\]"):
        learn.fit(1)


class XYLearner(Learner):
    """Batches `{"x": ..., "y": ...}`: one method says how to split them."""

    def split_batch(self, batch):
        return batch["x"], batch["y"]


def test_split_batch_is_the_one_place_to_change_the_batch_structure():
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    loader = DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=16)
    m = MetricsS()
    m.output = lambda row: None
    learn = XYLearner(nn.Linear(8, 3), SimpleNamespace(train=loader, valid=loader), F.cross_entropy, subs=[m])
    learn.fit(1)
    assert learn.global_step == 2 and len(m.history) == 2


def test_ragged_token_rows_ask_for_padding():
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1, 2], [1, 2, 3]], "label": [0, 1]}),
                               "test": datasets.Dataset.from_dict({"input_ids": [[1, 2]], "label": [0]})})
    with pytest.raises(ValueError, match="different lengths .*padding='max_length'"):
        DataLoaders.from_hf_dd(dd, 2)


def test_device_placement_takes_mapping_batches():
    from nntrain import DeviceS

    def run(*subs):
        torch.manual_seed(0)
        learn = Learner(TinyTextClassifier(), DataLoaders.from_hf_dd(text_dd(), 16), F.cross_entropy,
                        torch.optim.SGD, lr=0.1, subs=list(subs))
        learn.fit(2, valid=False)
        return [p.detach().clone() for p in learn.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(run(), run(DeviceS("cpu"))))
