"""Checkpoints lose nothing and mix nothing: one run per directory, one writer, exclusive
temporary files, no writes through links, non-finite buffers refused, Ctrl-C held during a write,
clear errors for unusable directories and full disks; bad batches and length-less loaders."""

from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import nntrain.checkpoint as ckpt
from nntrain import (
    CheckpointError,
    CheckpointS,
    GradAccumS,
    Learner,
    MetricsS,
    Subscriber,
)
from nntrain.checkpoint import DirectoryLock, atomic_write, list_checkpoints
from nntrain.checkpoint_state import latest_checkpoint, load_checkpoint
from nntrain.subscribers.checkpoint import NonFiniteWeightsError
from tests.helpers import tiny_data, tiny_dls, tiny_model


def learner(*subs, model=None, dls=None):
    m = MetricsS()
    m.output = lambda row: None
    return Learner(model or tiny_model(), dls or tiny_dls(), F.cross_entropy, lr=0.1, subs=[m, *subs])


class Steps(Subscriber):
    def __init__(self):
        self.batches = 0

    def before_batch(self, learn):
        self.batches += 1


def test_a_fresh_fit_into_another_runs_directory_is_refused_before_training(tmp_path):
    learner(CheckpointS(tmp_path)).fit(2)
    before = list_checkpoints(tmp_path)
    steps = Steps()
    other = learner(CheckpointS(tmp_path), steps)
    with pytest.raises(ValueError, match="holds checkpoints of another run.*resume='last'"):
        other.fit(2)
    assert steps.batches == 0 and list_checkpoints(tmp_path) == before
    learner(CheckpointS(tmp_path)).fit(3, resume="last")  # continuing that run is fine
    assert latest_checkpoint(tmp_path)[1]["position"]["epoch"] == 2


def test_the_same_learner_fitting_again_keeps_its_own_directory(tmp_path):
    learn = learner(CheckpointS(tmp_path, keep=2))
    learn.fit(1)
    learn.fit(2)
    assert len(list_checkpoints(tmp_path)) == 2


def test_pruning_deletes_only_this_runs_files_never_an_unloadable_newer_one(tmp_path):
    learner(CheckpointS(tmp_path, keep=2)).fit(2)
    junk = tmp_path / "ckpt-s9999999999-e000000-end.pt"  # sorts newest, does not load
    junk.write_bytes(b"not a checkpoint")
    learn = learner(CheckpointS(tmp_path, keep=2))
    with pytest.warns(RuntimeWarning, match="skipping unusable checkpoint"):
        learn.fit(4, resume="last")
    assert junk.exists()
    saved = learn.subs[1].saved
    assert [p.name for p in saved] == [p.name for p in list_checkpoints(tmp_path) if p != junk][-2:]
    assert load_checkpoint(saved[-1])["position"] == {"epoch": 3, "iter": None, "finished": False}


def test_a_second_writer_of_a_directory_fails_before_training(tmp_path):
    holder = DirectoryLock(tmp_path)
    holder.acquire()
    steps = Steps()
    try:
        with pytest.raises(RuntimeError, match=f"another fit is writing checkpoints to {tmp_path}.*pid {os.getpid()}"):
            learner(CheckpointS(tmp_path), steps).fit(1)
    finally:
        holder.release()
    assert steps.batches == 0
    learner(CheckpointS(tmp_path)).fit(1)  # the lock is free again, and freed after the fit
    DirectoryLock(tmp_path).acquire()


def test_writes_never_go_through_a_planted_link_and_stale_temporaries_go(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "ckpt" / "ckpt-s0000000001-e000000-end.pt"
    target.parent.mkdir()
    target.symlink_to(victim)
    atomic_write(target, lambda tmp: torch.save({"x": 1}, tmp))
    assert victim.read_text() == "precious" and not target.is_symlink() and torch.load(target) == {"x": 1}
    stale = tmp_path / "run" / ".ckpt-s0000000004-e000000-b0000003.pt.4242.deadbeef.tmp"
    stale.parent.mkdir()
    stale.symlink_to(victim)
    learner(CheckpointS(stale.parent)).fit(1)
    assert not os.path.lexists(stale) and victim.read_text() == "precious"
    assert not list(stale.parent.glob(".*.tmp"))


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


class PoisonBuffer(Subscriber):
    def after_batch(self, learn):
        if learn.mode == "train" and learn.global_step == 9:
            learn.model[1].running_var.fill_(float("inf"))


def test_a_non_finite_buffer_is_never_checkpointed_and_the_good_ones_stay(tmp_path):
    learn = learner(CheckpointS(tmp_path, every_batches=4, every_epochs=None, keep=2), PoisonBuffer(), model=bn_model())
    with pytest.raises(NonFiniteWeightsError, match="1.running_var"):
        learn.fit(3)
    good = list_checkpoints(tmp_path)
    assert [load_checkpoint(p)["global_step"] for p in good] == [4, 8]


class PermissiveLoss:
    def __call__(self, preds, targets):
        return (preds.sum() - targets.float().sum()) ** 2 * 1e-6  # accepts any shapes


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_bare_tensor_batches_are_refused_even_when_the_loss_accepts_them(engine):
    x = tiny_data(32).tensors[0]
    loader = DataLoader(x, batch_size=16)  # batch[0] would be sample 0, batch[1] sample 1
    learn = Learner(tiny_model(), type("D", (), {"train": loader, "valid": loader})(), PermissiveLoss())
    with pytest.raises(TypeError, match=r"a batch must be a pair \(inputs, targets\).*a tensor of shape \(16, 8\)"):
        learn.fit(1, engine=engine, **({"enable_progress_bar": False} if engine == "lightning" else {}))
    assert learn.global_step == 0


class Stream(IterableDataset):
    """Batches without a length (a stream)."""

    def __iter__(self):
        data = tiny_data(96)
        for i in range(0, 96, 16):
            yield data.tensors[0][i:i + 16], data.tensors[1][i:i + 16]


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_a_loader_without_a_length_trains_on_both_engines(engine):
    stream = DataLoader(Stream(), batch_size=None)
    m = MetricsS()
    m.output = lambda row: None
    learn = Learner(tiny_model(), type("D", (), {"train": stream, "valid": stream})(), F.cross_entropy,
                    subs=[m, GradAccumS(4)])
    learn.fit(2, engine=engine)
    assert learn.global_step == 2  # one full group of 4 per epoch; the short last one waits (no length)
    assert [r["mode"] for r in m.history] == ["train", "valid"] * 2


def test_unusable_checkpoint_directories_are_refused_before_training(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for directory in (a_file, a_file / "below"):
        steps = Steps()
        with pytest.raises(ValueError, match=f"CheckpointS cannot use {directory}"):
            learner(CheckpointS(directory), steps).fit(1)
        assert steps.batches == 0
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        learner(CheckpointS(a_file)).fit(1, resume="last")


def test_a_full_disk_names_the_checkpoint_and_the_cause(tmp_path, monkeypatch):
    def full(state, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(ckpt.torch, "save", full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("U", (), {"free": 0})())
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*ckpt-s0000000006.*disk .* is full"):
        learner(CheckpointS(tmp_path)).fit(1)
    assert not list(tmp_path.glob(".*.tmp"))


def test_ctrl_c_during_a_write_finishes_the_file_then_interrupts(tmp_path, monkeypatch):
    real_save = torch.save

    def save_with_ctrl_c(state, f):
        if not hasattr(save_with_ctrl_c, "done"):
            save_with_ctrl_c.done = True
            os.kill(os.getpid(), signal.SIGINT)  # lands inside the write
        real_save(state, f)
    monkeypatch.setattr(ckpt.torch, "save", save_with_ctrl_c)
    learn = learner(CheckpointS(tmp_path, every_batches=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no checkpoint written" warning: the save completed
        with pytest.raises(KeyboardInterrupt):
            learn.fit(2)
    (path,) = list_checkpoints(tmp_path)
    assert load_checkpoint(path)["global_step"] == 2


class InterruptBetweenBatches(Subscriber):
    def before_batch(self, learn):
        if learn.mode == "train" and learn.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # held until the batch ends, where the save fails


def test_a_failing_interrupt_save_warns_and_the_interrupt_goes_on(tmp_path, monkeypatch):
    learn = learner(CheckpointS(tmp_path, every_epochs=None), InterruptBetweenBatches())
    monkeypatch.setattr(ckpt.torch, "save", lambda state, f: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.warns(RuntimeWarning, match="interrupt checkpoint could not be written"):
        with pytest.raises(KeyboardInterrupt):
            learn.fit(1)


def test_under_accumulation_checkpoints_follow_optimizer_steps(tmp_path):
    learner(CheckpointS(tmp_path, every_batches=1, every_epochs=None, keep=10), GradAccumS(4)).fit(1)
    positions = [load_checkpoint(p)["position"]["iter"] for p in list_checkpoints(tmp_path)]
    assert positions == [3, 5]  # the steps after batches 3 and 5 (the epoch's last)


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_resuming_from_a_missing_file_says_so(tmp_path, engine):
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1)
    missing = tmp_path / "ckpt-s0000000004-e000000-end.pt"
    with pytest.raises(CheckpointError, match=f"no checkpoint file at {missing}$"):
        learn.fit(1, resume=missing, engine=engine)
    assert learn.global_step == 0
