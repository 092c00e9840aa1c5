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
from nntrain.tokens import PaddedTokenDataset

VOCAB, LENGTH = 20, 6


def text_dd(n_train: int = 64, n_valid: int = 32, seed: int = 0, ragged: bool = False) -> datasets.DatasetDict:
    """Token sequences (padded with 0 to LENGTH, or left `ragged`) labelled by whether token 3
    occurs in them."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        lengths = torch.randint(2, LENGTH + 1, (n,), generator=g)
        ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        mask = (torch.arange(LENGTH) < lengths[:, None]).long()
        ids = ids * mask
        labels = ((ids == 3).any(dim=1)).long()
        ids, mask = ids.tolist(), mask.tolist()
        if ragged:
            ids, mask = ([row[:k] for row, k in zip(rows, lengths.tolist())] for rows in (ids, mask))
        return datasets.Dataset.from_dict(
            {"input_ids": ids, "attention_mask": mask, "label": labels.tolist()},
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


def make(hf_output=False, ragged=False):
    m = MetricsS(accuracy=MulticlassAccuracy())
    m.output = lambda row: None
    return Learner(TinyTextClassifier(hf_output=hf_output), DataLoaders.from_hf_dd(text_dd(ragged=ragged), 16),
                   F.cross_entropy, torch.optim.Adam, lr=0.05, subs=[m])


def test_token_columns_become_mapping_batches():
    dls = DataLoaders.from_hf_dd(text_dd(), 16, shuffle=False)
    batch = next(iter(dls.train))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].shape == (16, LENGTH) and batch["labels"].dtype == torch.int64


@pytest.mark.parametrize("hf_output, ragged", [(False, False), (True, True)])
def test_a_text_classifier_on_mapping_batches_trains_the_same_on_both_engines(hf_output, ragged):
    native, _ = assert_engines_agree(lambda: make(hf_output, ragged), epochs=3)
    rows = native.rows[0]
    assert rows[-1]["accuracy"] > rows[1]["accuracy"]  # it learns
    learn = native.learn
    if ragged:  # each batch padded to its longest row
        assert isinstance(learn.dls.train.dataset, PaddedTokenDataset)
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


def test_ragged_token_rows_are_padded_per_batch_unless_asked():
    rows = {"input_ids": [[5, 6], [5, 6, 7, 8], [5], [5, 6, 7]], "attention_mask": [[1] * n for n in (2, 4, 1, 3)],
            "label": [0, 1, 0, 1]}
    ds = datasets.Dataset.from_dict(rows)
    dd = datasets.DatasetDict({"train": ds, "test": ds})
    batches = list(DataLoaders.from_hf_dd(dd, 2, shuffle=False, pad_token_id=9).train)
    assert [b["input_ids"].tolist() for b in batches] == [[[5, 6, 9, 9], [5, 6, 7, 8]], [[5, 9, 9], [5, 6, 7]]]
    assert [b["attention_mask"].tolist() for b in batches] == [[[1, 1, 0, 0], [1, 1, 1, 1]], [[1, 0, 0], [1, 1, 1]]]
    assert batches[1]["labels"].tolist() == [0, 1]
    longest = list(DataLoaders.from_hf_dd(dd, 2, shuffle=False, token_padding="longest").valid)
    assert [b["input_ids"].shape for b in longest] == [(2, 4), (2, 4)]
    assert longest[1]["input_ids"].tolist() == [[5, 0, 0, 0], [5, 6, 7, 0]]
    torch.manual_seed(0)
    shuffled = torch.cat([b["labels"] for b in DataLoaders.from_hf_dd(dd, 3).train])
    assert sorted(shuffled.tolist()) == [0, 0, 1, 1]
    unequal = datasets.Dataset.from_dict({"input_ids": [[1, 2]], "attention_mask": [[1]], "label": [0]})
    with pytest.raises(ValueError, match="rows of different lengths: tokenize them together"):
        DataLoaders.from_hf_dd(datasets.DatasetDict({"train": unequal, "test": unequal}), 1)


def test_device_placement_takes_mapping_batches():
    from nntrain import DeviceS

    def run(*subs):
        torch.manual_seed(0)
        learn = Learner(TinyTextClassifier(), DataLoaders.from_hf_dd(text_dd(), 16), F.cross_entropy,
                        torch.optim.SGD, lr=0.1, subs=list(subs))
        learn.fit(2, valid=False)
        return [p.detach().clone() for p in learn.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(run(), run(DeviceS("cpu"))))
