"""Checkpoints under Lightning: CheckpointS writes Lightning checkpoints, `fit(engine="lightning",
resume=...)` hands them to the Trainer as `ckpt_path`, and a resumed run (at an epoch's end or
inside an epoch, after SIGKILL, from a ModelCheckpoint file) ends bitwise equal to an
uninterrupted one, with the same metric history."""

from __future__ import annotations

import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from nntrain.adapters import to_lightning, trainer_defaults
from nntrain.checkpoint import CheckpointError, list_checkpoints
from nntrain.checkpoint_state import is_lightning_checkpoint, load_checkpoint
from nntrain.resume import ResumePlan
from nntrain.subscribers import CheckpointS
from tests.test_checkpoint import EPOCHS, StopAt, assert_same, make

ROOT = Path(__file__).resolve().parents[2]


def reference(valid: bool = True):
    """The uninterrupted native run (plain DataLoader: a ResumableDataLoader serves the same batches)."""
    learn, metrics = make()
    torch.manual_seed(123)
    learn.fit(EPOCHS, valid=valid)
    return learn.model.state_dict(), metrics.history


@pytest.fixture(scope="module")
def refs():
    return {True: reference(True), False: reference(False)}


def quiet_fit(learn, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|no logger configured).*")
        return learn.fit(EPOCHS, engine="lightning", **kw)


@pytest.mark.parametrize("every_epochs, every_batches, stop_at, valid, newest", [
    (1, None, (1, 0), True, "ckpt-s0000000006-e000000-end.ckpt"),
    (None, 2, (1, 4), True, "ckpt-s0000000010-e000001-b0000003.ckpt"),
    # step 12 is epoch 1's last training batch: under Lightning that save moves to the epoch's end
    (None, 3, (2, 0), True, "ckpt-s0000000012-e000001-end.ckpt"),
    (None, 2, (1, 4), False, "ckpt-s0000000010-e000001-b0000003.ckpt"),
])
def test_checkpoint_s_under_lightning_resumes_bitwise(tmp_path, refs, every_epochs, every_batches, stop_at,
                                                      valid, newest):
    kw = dict(every_epochs=every_epochs, every_batches=every_batches)
    learn, _ = make(CheckpointS(tmp_path, **kw), StopAt(*stop_at, event="before_batch"), resumable=True)
    torch.manual_seed(123)
    quiet_fit(learn, valid=valid)
    newest_path = list_checkpoints(tmp_path)[-1]
    assert newest_path.name == newest
    state = load_checkpoint(newest_path)
    assert is_lightning_checkpoint(state) and state["nntrain"]["global_step"] == int(newest[6:16])
    assert "MetricsS" in state["nntrain"]["subs"]  # subscriber states (by state_key): the learner state

    learn, metrics = make(CheckpointS(tmp_path, **kw), resumable=True)
    torch.manual_seed(999)  # the checkpoint's RNG state must win over this
    quiet_fit(learn, valid=valid, resume="last")
    assert_same(learn, metrics, refs[valid])


def test_native_then_lightning_then_lightning_again_keeps_the_epoch_count(tmp_path, refs):
    learn, _ = make(CheckpointS(tmp_path), StopAt(1, 0, event="before_batch"), resumable=True)
    torch.manual_seed(123)
    learn.fit(EPOCHS)  # native: ckpt-...-e000000-end.pt
    learn, _ = make(CheckpointS(tmp_path, every_batches=2), StopAt(2, 2, event="before_batch"), resumable=True)
    quiet_fit(learn, resume="last")  # the Trainer's epoch 0 is the learner's epoch 1
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "ckpt-s0000000014-e000002-b0000001.ckpt"
    assert ResumePlan.read(newest, load_checkpoint(newest)).epoch_offset == 1
    learn, metrics = make(CheckpointS(tmp_path, every_batches=2), resumable=True)
    torch.manual_seed(999)
    quiet_fit(learn, resume="last")
    assert_same(learn, metrics, refs[True])


@pytest.fixture(scope="module")
def model_checkpoints(tmp_path_factory):
    """Every checkpoint two ModelCheckpoints write in an uninterrupted Lightning run: after every
    2nd step (`s<step>.ckpt`) and after every validation (`end<epoch>.ckpt`)."""
    directory = tmp_path_factory.mktemp("lightning_ckpts")
    learn, metrics = make(resumable=True)
    torch.manual_seed(123)
    callbacks = [ModelCheckpoint(dirpath=directory, every_n_train_steps=2, save_top_k=-1, filename="s{step}"),
                 ModelCheckpoint(dirpath=directory, save_top_k=-1, filename="end{epoch}")]
    quiet_fit(learn, callbacks=callbacks, enable_checkpointing=True)
    return directory, (learn.model.state_dict(), metrics.history)


def test_the_uninterrupted_lightning_run_equals_the_native_one(model_checkpoints, refs):
    _, (weights, history) = model_checkpoints
    assert history == refs[True][1] and all(torch.equal(weights[k], refs[True][0][k]) for k in weights)


@pytest.mark.parametrize("name", ["sstep=2", "sstep=4", "sstep=8", "sstep=10", "sstep=14", "sstep=16",
                                  "endepoch=0", "endepoch=1"])
def test_model_checkpoint_files_resume_through_ckpt_path_bitwise(model_checkpoints, refs, name):
    directory, _ = model_checkpoints
    learn, metrics = make(resumable=True)
    torch.manual_seed(999)
    quiet_fit(learn, resume=directory / f"{name}.ckpt")
    assert_same(learn, metrics, refs[True])


def test_own_trainer_resumes_with_ckpt_path(model_checkpoints, refs):
    directory, _ = model_checkpoints
    learn, metrics = make(resumable=True)
    module, callbacks = to_lightning(learn)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=callbacks, **trainer_defaults(torch.device("cpu")))
    torch.manual_seed(999)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|no logger configured).*")
        trainer.fit(module, ckpt_path=directory / "sstep=10.ckpt")
    assert_same(learn, metrics, refs[True])


def test_a_checkpoint_after_an_epochs_last_batch_resumes_without_its_validation(model_checkpoints, refs):
    directory, _ = model_checkpoints
    learn, metrics = make(resumable=True)
    torch.manual_seed(999)
    with pytest.warns(RuntimeWarning, match="without running epoch 0.s validation pass"):
        quiet_fit(learn, resume=directory / "sstep=6.ckpt")
    weights, history = refs[True]
    assert all(torch.equal(learn.model.state_dict()[k], weights[k]) for k in weights)
    # Lightning's own behaviour: epoch 0's validation pass is skipped, everything else is the same
    assert metrics.history == [row for row in history if (row["epoch"], row["mode"]) != (0, "valid")]


def test_a_plain_dataloader_resumes_epoch_ends_but_refuses_mid_epoch(model_checkpoints, refs):
    directory, _ = model_checkpoints
    learn, metrics = make()  # torch DataLoader
    torch.manual_seed(999)
    quiet_fit(learn, resume=directory / "endepoch=0.ckpt")
    assert_same(learn, metrics, refs[True])
    learn, _ = make()
    with pytest.raises(ValueError, match=r"inside epoch 1 \(after training batch 3\).*ResumableDataLoader"):
        quiet_fit(learn, resume=directory / "sstep=10.ckpt")


def test_own_trainer_refuses_a_mid_epoch_checkpoint_with_a_plain_dataloader(tmp_path):
    learn, _ = make(CheckpointS(tmp_path, every_batches=2, every_epochs=None), StopAt(0, 3))
    quiet_fit(learn)  # torch DataLoader: the checkpoints hold no loader position
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "ckpt-s0000000002-e000000-b0000001.ckpt"
    learn, _ = make()
    module, callbacks = to_lightning(learn)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=callbacks, **trainer_defaults(torch.device("cpu")))
    with pytest.raises(ValueError, match=r"inside epoch 0 \(after training batch 1\).*DataLoader\) cannot "
                                         r"continue an epoch.*ResumableDataLoader"):
        trainer.fit(module, ckpt_path=newest)


def test_bad_lightning_checkpoints_get_clear_errors(model_checkpoints, tmp_path):
    directory, _ = model_checkpoints
    good = directory / "endepoch=0.ckpt"
    learn, _ = make(resumable=True)
    with pytest.raises(CheckpointError, match="is a Lightning checkpoint: resume it with .*engine='lightning'"):
        learn.fit(EPOCHS, resume=good)  # native engine

    state = torch.load(good, weights_only=True)
    del state["nntrain"]
    torch.save(state, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="lacks nntrain's learner state"):
        quiet_fit(learn, resume=tmp_path / "foreign.ckpt")

    from nntrain.learner import MomentumLearner
    from tests.helpers import tiny_model

    other = MomentumLearner(tiny_model(n_out=4), learn.dls, learn.loss_fn, torch.optim.SGD, lr=0.1)
    with pytest.raises(CheckpointError, match=r"does not fit this model: missing in checkpoint: 2.weight.*not in model: 3.weight"):
        other.fit(EPOCHS, engine="lightning", resume=good)


WORKER = """
import os, signal, sys, warnings, torch
sys.path.insert(0, {root!r})
warnings.filterwarnings("ignore")
from nntrain.learner import Subscriber
from nntrain.subscribers import CheckpointS
from tests.test_checkpoint import make

class Kill(Subscriber):
    def after_batch(self, learn):
        if learn.model.training and (learn.epoch, learn.iter) == (1, 4):
            os.kill(os.getpid(), signal.SIGKILL)

learn, _ = make(CheckpointS({dir!r}, every_batches=2), Kill(), resumable=True)
torch.manual_seed(123)
learn.fit(3, engine="lightning")
"""


def test_sigkill_under_lightning_then_resume_past_a_truncated_newest_file(tmp_path, refs):
    proc = subprocess.run([sys.executable, "-c", WORKER.format(root=str(ROOT), dir=str(tmp_path))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = [p.name for p in list_checkpoints(tmp_path)]
    # killed in batch 4's after_batch before CheckpointS (the last callback) saved it
    assert names == ["ckpt-s0000000006-e000000-end.ckpt", "ckpt-s0000000008-e000001-b0000001.ckpt",
                     "ckpt-s0000000010-e000001-b0000003.ckpt"]
    newest = tmp_path / names[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # as if the kill had cut the write short
    learn, metrics = make(CheckpointS(tmp_path, every_batches=2), resumable=True)
    torch.manual_seed(999)
    with pytest.warns(RuntimeWarning, match=f"skipping unusable checkpoint .*{names[-1]}"):
        quiet_fit(learn, resume="last")
    assert_same(learn, metrics, refs[True])


def test_checkpoint_s_in_an_own_trainer_saves_at_epoch_ends_and_resumes(tmp_path, refs):
    learn, _ = make(CheckpointS(tmp_path), StopAt(1, 0, event="before_batch"), resumable=True)
    module, callbacks = to_lightning(learn)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=callbacks, **trainer_defaults(torch.device("cpu")))
    torch.manual_seed(123)
    trainer.fit(module)  # learn.fit_valid comes from the Trainer, not from fit_lightning
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-s0000000006-e000000-end.ckpt"]
    learn, metrics = make(resumable=True)
    module, callbacks = to_lightning(learn)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=callbacks, **trainer_defaults(torch.device("cpu")))
    torch.manual_seed(999)
    trainer.fit(module, ckpt_path=list_checkpoints(tmp_path)[0])
    assert_same(learn, metrics, refs[True])
