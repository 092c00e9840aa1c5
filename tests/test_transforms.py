"""Batch transforms: what each does, and `BatchTransformS`: the same numbers on both engines,
bitwise after a mid-epoch resume, its own stream per DDP rank, foreign transforms included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from nntrain import BatchTransformS, CheckpointS, Learner, MetricsS
from nntrain.events import CancelFitException, Subscriber
from nntrain.loaders import BatchLoader, ResumableDataLoader
from nntrain.testing import assert_engines_agree
from nntrain.transforms import (
    Compose,
    Cutout,
    Flatten,
    Normalize,
    RandomCrop,
    RandomFlip,
    RandomTranslate,
    random_crop,
)


def test_random_flip_flips_the_samples_its_draw_picks():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2 * 3, 1, 4, 5)
    assert torch.equal(RandomFlip(p=1.0)(x), x.flip(-1)) and torch.equal(RandomFlip(p=0.0)(x), x)
    g = torch.Generator().manual_seed(0)
    picked = torch.rand(6, generator=torch.Generator().manual_seed(0)) < 0.5
    out = RandomFlip()(x, generator=g)
    for i in range(6):
        assert torch.equal(out[i], x[i].flip(-1) if picked[i] else x[i])


def test_random_crop_takes_a_window_of_the_padded_sample():
    x = torch.rand(8, 3, 6, 7)
    padded = F.pad(x, (2, 2, 2, 2))
    out = RandomTranslate(2)(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    for i in range(8):  # each sample is some window of its own padded image
        assert any(torch.equal(out[i], padded[i, :, r:r + 6, c:c + 7]) for r in range(5) for c in range(5))
    small = RandomCrop(4)(x)
    assert small.shape == (8, 3, 4, 4)
    reflect = random_crop(x, padding=1, mode="reflect")
    assert reflect.shape == x.shape
    with pytest.raises(ValueError, match="larger than the padded image"):
        RandomCrop(9)(x)


def test_cutout_normalize_flatten_and_compose():
    x = torch.ones(4, 2, 8, 8)
    out = Cutout(4)(x, generator=torch.Generator().manual_seed(0))
    holes = (out == 0).sum(dim=(1, 2, 3))
    assert ((holes > 0) & (holes <= 2 * 16)).all() and torch.equal(Cutout(4, p=0.0)(x), x)
    norm = Normalize([1.0, 0.5], [2.0, 0.25])(x)
    assert torch.equal(norm[:, 0], torch.zeros(4, 8, 8)) and torch.equal(norm[:, 1], torch.full((4, 8, 8), 2.0))
    assert Flatten()(x).shape == (4, 128)
    pipeline = Compose([RandomFlip(), Normalize([0.5, 0.5], [1.0, 1.0]), Flatten()])
    assert pipeline.takes_generator and not Compose([lambda t: t + torch.rand(1)]).takes_generator
    a = pipeline(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, pipeline(x, generator=torch.Generator().manual_seed(3)))


# ----- BatchTransformS ---------------------------------------------------------------------------


def image_dls(resumable: bool = True) -> SimpleNamespace:
    """Tiny 3 x 6 x 6 images whose class is the brighter half; 48 training, 16 validation."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 6, 6, generator=g)
    y = (x[:, :, :, :3].mean(dim=(1, 2, 3)) > x[:, :, :, 3:].mean(dim=(1, 2, 3))).long()
    loader = ResumableDataLoader if resumable else BatchLoader
    return SimpleNamespace(train=loader(TensorDataset(x[:48], y[:48]), batch_size=8, shuffle=True),
                           valid=BatchLoader(TensorDataset(x[48:], y[48:]), batch_size=8))


def augmenting_learner(*subs: Subscriber, fn=None) -> tuple[Learner, MetricsS]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 2))
    metrics = MetricsS()
    metrics.output = lambda row: None
    augment = BatchTransformS(fn or [RandomTranslate(1), RandomFlip(), Cutout(2), Flatten()])
    flat = BatchTransformS(Flatten(), train=False, valid=True)
    return Learner(model, image_dls(), F.cross_entropy, lr=0.1, subs=[metrics, augment, flat, *subs]), metrics


def test_augmentation_gives_the_same_numbers_on_both_engines():
    native, _ = assert_engines_agree(lambda: augmenting_learner()[0], epochs=2)
    augment = native.learn.subs[1]
    assert set(augment.state_dict()["generators"]) == {"cpu"}


def test_a_foreign_transform_draws_from_the_subscribers_stream_and_leaves_the_global_one():
    def jitter(x):  # a transform drawing from torch's default generator, as torchvision's do
        return (x + 0.1 * torch.randn(x.shape)).reshape(len(x), -1)

    assert_engines_agree(lambda: augmenting_learner(fn=jitter)[0], epochs=1)
    sub = BatchTransformS(jitter, seed=5)
    sub.before_fit(SimpleNamespace(engine=SimpleNamespace(rank=0)))
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = sub.transform(torch.zeros(2, 3))
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    again = BatchTransformS(jitter, seed=5)
    again.before_fit(SimpleNamespace(engine=SimpleNamespace(rank=0)))
    assert torch.equal(again.transform(torch.zeros(2, 3)), a) and not torch.equal(sub.transform(torch.zeros(2, 3)), a)


def test_each_ddp_rank_draws_its_own_numbers():
    def draws(rank: int) -> torch.Tensor:
        sub = BatchTransformS(RandomFlip(), seed=7)
        sub.before_fit(SimpleNamespace(engine=SimpleNamespace(rank=rank)))
        return torch.rand(4, generator=sub.generator(torch.device("cpu")))
    assert torch.equal(draws(0), draws(0))
    assert not torch.equal(draws(0), draws(1))


def test_validation_batches_are_left_alone_unless_asked():
    seen = []

    class Look(Subscriber):
        order = 0  # after BatchTransformS

        def before_batch(self, learn):
            seen.append((learn.mode, learn.batch[0]))

    learn, _ = augmenting_learner(Look())
    learn.fit(1)
    assert {tuple(x.shape) for m, x in seen if m == "train"} == {(8, 108)}
    valid = torch.cat([x for m, x in seen if m == "valid"])  # flattened (valid=True) but not augmented
    assert torch.equal(valid, learn.dls.valid.dataset.tensors[0].reshape(16, -1))
    with pytest.raises(TypeError, match="pass key="):
        BatchTransformS(RandomFlip()).before_batch(SimpleNamespace(mode="train", batch={"x": torch.zeros(1)}))


class StopAt(Subscriber):
    def __init__(self, epoch, it):
        self.at = (epoch, it)

    def after_batch(self, learn):
        if learn.mode == "train" and (learn.epoch, learn.iter) == self.at:
            raise CancelFitException()


@pytest.mark.filterwarnings("ignore:the checkpoint holds the state of CheckpointS")
def test_a_mid_epoch_resume_draws_the_same_augmentation_bitwise(tmp_path):
    learn, metrics = augmenting_learner()
    torch.manual_seed(123)
    learn.fit(3)
    reference = (learn.model.state_dict(), metrics.history)
    stopped, _ = augmenting_learner(CheckpointS(tmp_path, every_batches=2), StopAt(1, 3))
    torch.manual_seed(123)
    stopped.fit(3)
    for engine in ("native", "lightning"):
        learn, metrics = augmenting_learner()
        torch.manual_seed(999)  # the checkpoint's generators and RNG win over this
        learn.fit(3, resume=tmp_path, engine=engine)
        weights, history = reference
        assert all(torch.equal(learn.model.state_dict()[k], v) for k, v in weights.items()), engine
        assert metrics.history == history, engine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transforms_draw_on_the_batchs_cuda_device():
    x = torch.rand(16, 3, 8, 8, device="cuda")
    sub = BatchTransformS([RandomTranslate(2), RandomFlip(), Cutout(3)], seed=3)
    sub.before_fit(SimpleNamespace(engine=SimpleNamespace(rank=0)))
    out = sub.transform(x)
    assert out.is_cuda and out.shape == x.shape and set(sub.state_dict()["generators"]) == {"cuda:0"}
    again = BatchTransformS([RandomTranslate(2), RandomFlip(), Cutout(3)], seed=3)
    again.before_fit(SimpleNamespace(engine=SimpleNamespace(rank=0)))
    assert torch.equal(again.transform(x), out)
    foreign = BatchTransformS(lambda t: t + torch.rand(t.shape, device=t.device) + torch.rand(1).to(t.device), seed=3)
    foreign.before_fit(SimpleNamespace(engine=SimpleNamespace(rank=0)))
    state = torch.cuda.get_rng_state()
    foreign.transform(x)
    assert torch.equal(torch.cuda.get_rng_state(), state)  # the device's default stream is untouched
    assert set(foreign.state_dict()["generators"]) == {"cpu", "cuda:0"}
