"""Streaming splits (an `IterableDatasetDict`): the same batches as the map-style split, no
length, the same numbers on both engines, one part per DDP rank, a resumable position."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import nntrain.streaming as streaming
from nntrain import CheckpointS, DataLoaders, Learner, MetricsS
from nntrain.events import CancelFitException, Subscriber
from nntrain.testing import assert_engines_agree

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})


def image_split(n: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    pics = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"image": pics, "label": [i % 2 for i in range(n)]}, features=FEATURES)


@pytest.fixture(scope="module")
def splits() -> tuple[datasets.Dataset, datasets.Dataset]:
    return image_split(40, 0), image_split(12, 1)


def streamed(splits, shards: int = 4) -> datasets.IterableDatasetDict:
    train, valid = splits
    return datasets.IterableDatasetDict({"train": train.to_iterable_dataset(num_shards=shards),
                                         "test": valid.to_iterable_dataset()})


def test_a_stream_gives_the_map_style_batches_without_a_length(splits):
    stream = DataLoaders.from_hf_dd(streamed(splits), 8, shuffle=False, flatten=False)
    mapped = DataLoaders.from_hf_dd(datasets.DatasetDict({"train": splits[0], "test": splits[1]}), 8, shuffle=False,
                                    flatten=False, cache=False)
    for split in ("train", "valid"):
        pairs = list(zip(getattr(stream, split), getattr(mapped, split), strict=True))
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in pairs)
    with pytest.raises(TypeError):
        len(stream.train)
    assert repr(stream) == "DataLoaders(train=a stream, valid=a stream)"


def test_the_shuffle_follows_torch_seed_and_changes_each_epoch(splits):
    dls = DataLoaders.from_hf_dd(streamed(splits), 8, shuffle_buffer=16)

    def epoch():
        return torch.cat([x for x, _ in dls.train])

    torch.manual_seed(0)
    first, second = epoch(), epoch()
    torch.manual_seed(0)
    assert torch.equal(epoch(), first) and not torch.equal(first, second)
    assert torch.equal(first.sort(dim=0).values, second.sort(dim=0).values)  # the same rows


class Lengths(Subscriber):
    def __init__(self):
        self.seen = set()

    def before_epoch(self, learn):
        self.seen.add(learn.n_batches)


def stream_learner(splits, *subs):
    torch.manual_seed(0)
    metrics = MetricsS()
    metrics.output = lambda row: None
    dls = DataLoaders.from_hf_dd(streamed(splits), 8, shuffle_buffer=16)
    return Learner(nn.Linear(48, 2), dls, F.cross_entropy, lr=0.1, subs=[metrics, *subs]), metrics


def test_a_stream_trains_the_same_on_both_engines(splits):
    lengths = Lengths()
    native, _ = assert_engines_agree(lambda: stream_learner(splits, lengths)[0], epochs=2)
    assert lengths.seen == {None} and len(native.trace.losses) == 2 * 5


def test_each_ddp_rank_reads_its_own_part(splits, monkeypatch):
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(streaming, "rank_and_world", lambda rank=rank: (rank, 2))
        dls = DataLoaders.from_hf_dd(streamed(splits, shards=4), 4, flatten=True)
        torch.manual_seed(0)
        seen.append({tuple(row.tolist()) for x, _ in dls.train for row in x})
    assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]


class StopAt(Subscriber):
    def after_batch(self, learn):
        if learn.mode == "train" and (learn.epoch, learn.iter) == (1, 2):
            raise CancelFitException()


@pytest.mark.filterwarnings("ignore:the checkpoint holds the state of CheckpointS")
def test_a_stream_resumes_mid_epoch_by_reading_up_to_its_position(splits, tmp_path):
    learn, metrics = stream_learner(splits)
    torch.manual_seed(1)
    learn.fit(3)
    reference = learn.model.state_dict(), metrics.history
    stopped, _ = stream_learner(splits, CheckpointS(tmp_path, every_batches=1), StopAt())
    torch.manual_seed(1)
    stopped.fit(3)
    learn, metrics = stream_learner(splits)
    learn.fit(3, resume=tmp_path)
    assert all(torch.equal(learn.model.state_dict()[k], v) for k, v in reference[0].items())
    assert metrics.history == reference[1]
    loader = learn.dls.train
    assert loader.state_dict() == {"epoch_rng": None, "served": 0}  # an ended stream epoch: nothing to continue


def test_streamed_token_rows_are_padded_per_batch():
    rows = {"input_ids": [[1] * n for n in (2, 5, 3, 1)], "label": [0, 1, 0, 1]}
    ds = datasets.Dataset.from_dict(rows)
    dd = datasets.IterableDatasetDict({"train": ds.to_iterable_dataset(), "test": ds.to_iterable_dataset()})
    batches = list(DataLoaders.from_hf_dd(dd, 2, shuffle=False, pad_token_id=9).train)
    assert [b["input_ids"].shape for b in batches] == [(2, 5), (2, 3)]
    assert batches[1]["input_ids"].tolist() == [[1, 1, 1], [1, 9, 9]]
    with pytest.raises(ValueError, match="a stream pads per batch"):
        DataLoaders.from_hf_dd(dd, 2, token_padding="longest")
