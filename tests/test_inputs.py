"""Bad arguments, bad models and bad resumes: a clear error (or warning) before work is done,
the same on both engines where it concerns them."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from nntrain import CheckpointError, CheckpointS, Learner, MetricsS, Subscriber
from tests.helpers import BasicOptim, tiny_data, tiny_dls, tiny_model


def learner(*subs, **kw):
    m = MetricsS()
    m.output = lambda row: None
    return Learner(kw.pop("model", None) or tiny_model(), kw.pop("dls", None) or tiny_dls(),
                   kw.pop("loss_fn", F.cross_entropy), kw.pop("optim", torch.optim.SGD), subs=[m, *subs], **kw)


class Steps(Subscriber):
    def __init__(self):
        self.batches = 0

    def before_batch(self, learn):
        self.batches += 1


@pytest.mark.parametrize("lr", ["0.1", float("nan"), float("inf"), -0.1, True])
@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_a_bad_lr_is_refused_before_training(lr, engine):
    steps = Steps()
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        learner(steps).fit(1, lr=lr, engine=engine)
    assert steps.batches == 0
    with pytest.raises(ValueError, match="lr must be"):
        Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=lr)


@pytest.mark.parametrize("subs, match", [
    ([3], r"subs\[0\] is a int with no event method"),
    ([MetricsS], r"subs\[0\] is the class MetricsS, not a subscriber: pass an instance, MetricsS\(\.\.\.\)"),
    (MetricsS(), "subs must be a list of subscribers"),
])
def test_subs_that_are_not_subscribers_are_refused(subs, match):
    with pytest.raises(TypeError, match=match):
        learner().fit(1, subs=subs)
    with pytest.raises(TypeError, match=match):
        Learner(tiny_model(), tiny_dls(), F.cross_entropy, subs=subs)


def test_subs_none_means_no_subscribers():
    learn = learner()
    learn.fit(1, subs=None)
    assert learn.global_step == 6


@pytest.mark.parametrize("resume", [True, ""])
def test_a_resume_that_is_no_path_is_refused(resume):
    with pytest.raises(TypeError, match='resume must be a checkpoint file, a directory or "last"'):
        learner().fit(1, resume=resume)


@pytest.mark.parametrize("loss_fn, match", [
    (lambda preds, y: 1.0, r"it returned a float \(compute it with torch ops\)"),
    (lambda preds, y: F.cross_entropy(preds, y, reduction="none"), r"a tensor of shape \(16,\) \(reduce it"),
])
@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_a_loss_that_is_not_one_number_is_refused_at_the_first_batch(loss_fn, match, engine):
    learn = learner(loss_fn=loss_fn)
    with pytest.raises(TypeError, match=match):
        learn.fit(1, engine=engine)
    assert learn.global_step == 0


class FailsInCleanup(Subscriber):
    def cleanup_fit(self, learn):
        raise RuntimeError("cleanup broke")


class FailsInBatch(Subscriber):
    def after_batch(self, learn):
        raise ValueError("the first error")


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_a_cleanup_error_does_not_mask_the_first_error(engine):
    with pytest.warns(RuntimeWarning, match="FailsInCleanup.cleanup_fit failed while an earlier error.*cleanup broke"):
        with pytest.raises(ValueError, match="the first error"):
            learner(FailsInBatch(), FailsInCleanup()).fit(1, engine=engine)
    with pytest.raises(RuntimeError, match="cleanup broke"):  # alone, a cleanup's error is raised
        learner(FailsInCleanup()).fit(1, engine=engine)


def test_a_model_failure_names_the_input_shape_and_dtype():
    learn = learner(model=nn.Sequential(nn.Linear(7, 3)))
    with pytest.raises(RuntimeError) as info:
        learn.fit(1)
    assert "model(inputs) failed: inputs shape (16, 8), dtype torch.float32" in "\n".join(info.value.__notes__)


def test_a_batchnorm_batch_of_one_points_to_drop_last():
    from torch.utils.data import BatchSampler, SequentialSampler

    valid = DataLoader(tiny_data(16), batch_size=16)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    dls = SimpleNamespace(train=DataLoader(tiny_data(97), batch_size=16), valid=valid)
    learn = learner(model=model, dls=dls)
    with pytest.raises(ValueError, match=r"last batch holds 1 sample \(97 samples, batch_size 16\).*drop_last=True"):
        learn.fit(1)  # found from the loader before any batch
    assert learn.global_step == 0
    sampler = BatchSampler(SequentialSampler(range(97)), 16, drop_last=False)  # a loader it cannot see into
    dls = SimpleNamespace(train=DataLoader(tiny_data(97), batch_sampler=sampler), valid=valid)
    with pytest.raises(ValueError, match="more than 1 value per channel") as info:
        learner(model=model, dls=dls).fit(1)
    assert any("drop_last=True" in note for note in info.value.__notes__)


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_an_empty_validation_loader_warns_and_runs_no_validation_on_both_engines(engine):
    dls = SimpleNamespace(train=DataLoader(tiny_data(32), batch_size=16), valid=DataLoader(tiny_data(0), batch_size=16))
    learn = learner(dls=dls)
    with pytest.warns(RuntimeWarning, match="validation loader is empty"):
        learn.fit(2, engine=engine)
    assert [r["mode"] for r in learn.subs[0].history] == ["train", "train"]


def test_a_generator_as_loader_is_refused_before_training():
    data = tiny_data(32)
    gen = ((data.tensors[0][i:i + 16], data.tensors[1][i:i + 16]) for i in (0, 16))
    with pytest.raises(TypeError, match="dls.train is an iterator .*used up after one pass"):
        learner(dls=SimpleNamespace(train=gen, valid=DataLoader(data, batch_size=16))).fit(2)


# ----- resumes that cannot continue this fit ------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Checkpoints of a 2-epoch SGD run: every 2 batches and at each epoch's end."""
    directory = tmp_path_factory.mktemp("run")
    learner(CheckpointS(directory, every_batches=2, keep=20)).fit(2)
    return directory


def test_a_checkpoint_past_the_fits_epochs_is_refused(run_dir, capsys):
    with pytest.raises(ValueError, match=r"past this 1-epoch fit: .*fit\(3 or more"):
        learner().fit(1, resume=run_dir)
    learn = learner(Steps())
    with pytest.warns(RuntimeWarning, match="ends this 2-epoch run: nothing left to train"):
        learn.fit(2, resume=run_dir)
    assert learn.subs[1].batches == 0
    assert "nntrain: resuming from " in capsys.readouterr().err


def test_a_mid_epoch_position_past_the_loaders_end_is_refused(run_dir):
    small = tiny_dls(n_train=48)  # 3 batches per epoch; the checkpoint is after batch 3 of epoch 0
    with pytest.raises(ValueError, match=r"after batch 3, but the training loader has 3 batches per epoch"):
        learner(dls=small).fit(2, resume=run_dir / "ckpt-s0000000004-e000000-b0000003.pt")


@pytest.mark.parametrize("optim, match", [
    (torch.optim.Adam, r"another optimizer \(its param groups have .*momentum.*Adam has .*betas"),
    (BasicOptim, "BasicOptim\\) has no load_state_dict"),
])
def test_another_optimizer_class_is_refused_naming_both(run_dir, optim, match):
    with pytest.raises(CheckpointError, match=match):
        learner(optim=optim).fit(3, resume=run_dir)


class MetricsV2(MetricsS):
    """A MetricsS whose state layout changed."""

    def load_state_dict(self, state):
        self.history = state["rows"]


def test_a_subscriber_state_that_does_not_fit_names_the_subscriber(run_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, subs=[MetricsV2()])
    learn.subs[0].output = lambda row: None
    ckpt = run_dir / "ckpt-s0000000012-e000001-end.pt"
    state = torch.load(ckpt, weights_only=True)
    state["subs"] = {"MetricsV2": state["subs"]["MetricsS"]}
    torch.save(state, run_dir.parent / "renamed.pt")
    with pytest.raises(CheckpointError, match=r"saved state of MetricsV2 does not fit this MetricsV2 \(KeyError"):
        learn.fit(3, resume=run_dir.parent / "renamed.pt")


class _Dicts(torch.utils.data.Dataset):
    """Mapping items, with or without targets under 'labels'."""

    def __init__(self, labels: bool = True) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i):
        item = {"x": torch.full((8,), float(i))}
        return {**item, "labels": torch.tensor(i % 3)} if self.labels else item


class _KwargModel(nn.Module):
    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.lin, self.broken = nn.Linear(8, 3), broken

    def forward(self, x):
        return self.lin(x) + (torch.zeros(5, 3) if self.broken else 0)


def test_validation_items_without_targets_are_refused_before_training_and_dict_inputs_show_each_shape():
    dls = SimpleNamespace(train=DataLoader(_Dicts(), batch_size=8), valid=DataLoader(_Dicts(False), batch_size=8))
    learn = learner(model=_KwargModel(), dls=dls)
    with pytest.raises(TypeError, match=r"the validation loader yielded a dict .*its keys: \['x'\]"):
        learn.fit(1)
    assert learn.global_step == 0
    dls.valid = DataLoader(_Dicts(), batch_size=8)
    with pytest.raises(RuntimeError) as info:
        learner(model=_KwargModel(broken=True), dls=dls).fit(1)
    assert "model(inputs) failed: inputs {'x': shape (8, 8)}" in info.value.__notes__
