"""Checkpoints: atomic files, exact resume (epoch boundary, mid-epoch, after SIGKILL, after a
truncated file), KeyboardInterrupt, the NaN guard, and clear errors for bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torcheval.metrics import MulticlassAccuracy

from nntrain.checkpoint import (
    CheckpointError,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from nntrain.checkpoint_state import FORMAT, latest_checkpoint, load_checkpoint
from nntrain.learner import CancelFitException, Learner, MomentumLearner, Subscriber
from nntrain.rng import rng_state, set_rng_state
from nntrain.subscribers import (
    CheckpointS,
    MetricsS,
    NanGuardS,
    ProgressS,
    TensorBoardS,
)
from nntrain.subscribers.checkpoint import NonFiniteWeightsError
from nntrain.subscribers.guard import NonFiniteLossError
from nntrain.subscribers.metrics import batch_accuracy
from tests.helpers import tiny_dls

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3  # tiny_dls: 6 training batches of 16 per epoch, 2 validation batches


def dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def make(*subs: Subscriber, resumable: bool = False) -> tuple[Learner, MetricsS]:
    """A MomentumLearner (gradients are state) on shuffled data with Dropout (RNG is state);
    `resumable`: its train loader is a ResumableDataLoader (same batches)."""
    metrics = MetricsS(accuracy=MulticlassAccuracy(), fn_acc=batch_accuracy, flush_every=4)
    metrics.output = lambda row: None
    learn = MomentumLearner(dropout_model(), tiny_dls(resumable=resumable), F.cross_entropy, torch.optim.SGD, lr=0.1,
                            subs=[metrics, *subs], mom=0.85)
    return learn, metrics


def reference():
    learn, metrics = make()
    torch.manual_seed(123)
    learn.fit(EPOCHS)
    return learn.model.state_dict(), metrics.history


def assert_same(learn, metrics, ref):
    weights, history = ref
    state = learn.model.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert metrics.history == history
    assert learn.global_step == EPOCHS * 6


@pytest.fixture(scope="module")
def ref():
    return reference()


class StopAt(Subscriber):
    """Raise `exc` at `event` of training batch `iter_` of epoch `epoch`."""

    def __init__(self, epoch: int, iter_: int, exc: type[BaseException] = CancelFitException,
                 event: str = "after_batch") -> None:
        self.at, self.exc = (epoch, iter_), exc
        setattr(self, event, self._maybe_raise)

    def _maybe_raise(self, learn) -> None:
        if learn.model.training and (learn.epoch, learn.iter) == self.at:
            raise self.exc()


def resume(directory, **kw):
    learn, metrics = make(CheckpointS(directory, **kw))
    torch.manual_seed(999)  # the checkpoint's RNG state must win over this
    learn.fit(EPOCHS, resume="last")
    return learn, metrics


# ----- mechanics ---------------------------------------------------------------------------------


def test_save_is_atomic_keeps_last_k_and_load_names_a_corrupt_file(tmp_path):
    state = {k: 0 for k in ("model", "optimizer", "grads", "global_step", "position", "rng", "epoch_rng", "subs")}
    state["format"] = FORMAT
    for i in range(5):
        save_checkpoint(dict(state, global_step=i), tmp_path / f"ckpt-{i}.pt")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert [p.name for p in prune_checkpoints(tmp_path, 3)] == ["ckpt-0.pt", "ckpt-1.pt"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-2.pt", "ckpt-3.pt", "ckpt-4.pt"]
    newest = tmp_path / "ckpt-4.pt"
    newest.write_bytes(newest.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="ckpt-4.pt"):
        load_checkpoint(newest)
    save_checkpoint({"model": {}}, tmp_path / "ckpt-5.pt")  # loads, but is missing keys
    with pytest.raises(CheckpointError, match="ckpt-5.pt.*missing"):
        load_checkpoint(tmp_path / "ckpt-5.pt")
    with pytest.warns(RuntimeWarning) as record:
        path, loaded = latest_checkpoint(tmp_path)
    assert path.name == "ckpt-3.pt" and loaded["global_step"] == 3
    assert ["ckpt-5.pt" in str(record[0].message), "ckpt-4.pt" in str(record[1].message)] == [True, True]


def test_rng_state_round_trip_covers_python_numpy_and_torch():
    import random

    import numpy as np

    state = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


# ----- exact resume ------------------------------------------------------------------------------


def test_resume_at_an_epoch_boundary_is_bitwise_equal(tmp_path, ref):
    learn, _ = make(CheckpointS(tmp_path), StopAt(1, 0, event="before_batch"))
    torch.manual_seed(123)
    learn.fit(EPOCHS)  # stops at the start of epoch 1: the newest checkpoint is epoch 0's end
    assert list_checkpoints(tmp_path)[-1].name.endswith("-e000000-end.pt")
    assert_same(*resume(tmp_path), ref)


@pytest.mark.parametrize("every_batches, stop_at", [(1, (1, 3)), (2, (1, 4)), (2, (2, 0))])
def test_resume_mid_epoch_is_bitwise_equal(tmp_path, ref, every_batches, stop_at):
    learn, _ = make(CheckpointS(tmp_path, every_batches=every_batches), StopAt(*stop_at))
    torch.manual_seed(123)
    learn.fit(EPOCHS)  # the stopping batch's after_batch does not reach CheckpointS: it is redone
    assert_same(*resume(tmp_path, every_batches=every_batches), ref)


def test_resume_events_start_with_before_fit_and_the_resumed_epoch(tmp_path):
    learn, _ = make(CheckpointS(tmp_path, every_batches=2), StopAt(1, 2))
    torch.manual_seed(123)
    learn.fit(EPOCHS)  # newest checkpoint: epoch 1 after batch 1 (global step 8)
    from tests.helpers import Recorder

    rec = Recorder()
    learn, _ = make(CheckpointS(tmp_path, every_batches=2), rec)
    learn.fit(EPOCHS, resume="last")
    assert rec.trace[:3] == [("before_fit", "train", 1, -1), ("before_epoch", "train", 1, -1),
                             ("before_batch", "train", 1, 2)]


def test_resume_last_without_a_checkpoint_starts_from_the_beginning(tmp_path, ref):
    learn, metrics = make(CheckpointS(tmp_path))
    torch.manual_seed(123)
    learn.fit(EPOCHS, resume="last")
    assert_same(learn, metrics, ref)


# ----- faults ------------------------------------------------------------------------------------

WORKER = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from nntrain.learner import Subscriber
from nntrain.subscribers import CheckpointS
from tests.test_checkpoint import make

class Kill(Subscriber):
    def after_batch(self, learn):
        if learn.model.training and (learn.epoch, learn.iter) == (1, 3):
            os.kill(os.getpid(), signal.SIGKILL)

learn, _ = make(CheckpointS({dir!r}, every_batches=2), Kill())
torch.manual_seed(123)
learn.fit(3)
"""


def test_sigkill_mid_epoch_then_resume_and_a_truncated_newest_file(tmp_path, ref):
    proc = subprocess.run([sys.executable, "-c", WORKER.format(root=str(ROOT), dir=str(tmp_path / "a"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = [p.name for p in list_checkpoints(tmp_path / "a")]
    # killed in batch 3's after_batch before CheckpointS (order 1000) saved it: newest is batch 1
    assert names == ["ckpt-s0000000006-e000000-b0000005.pt", "ckpt-s0000000006-e000000-end.pt",
                     "ckpt-s0000000008-e000001-b0000001.pt"]  # keep=3
    (tmp_path / "b").mkdir()
    for name in names:
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    assert_same(*resume(tmp_path / "a", every_batches=2), ref)

    newest = tmp_path / "b" / names[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    with pytest.warns(RuntimeWarning, match=names[-1]):
        assert_same(*resume(tmp_path / "b", every_batches=2), ref)


class CtrlC(Subscriber):
    """Press Ctrl-C (a real SIGINT, `times` times) at `event` of batch `at` of a `mode` pass."""

    def __init__(self, at, event="before_batch", mode="train", times=1):
        self.at, self.mode, self.times = at, mode, times
        setattr(self, event, self._press)

    def _press(self, learn) -> None:
        if learn.mode == self.mode and (learn.epoch, learn.iter) == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_closes_bars_flushes_tensorboard_and_saves_then_propagates(tmp_path, ref):
    progress, board = ProgressS(), TensorBoardS(tmp_path / "runs")
    learn, _ = make(CheckpointS(tmp_path / "ck"), progress, board, CtrlC((1, 2)))
    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(EPOCHS)
    assert progress._bar is None and board._writer is None  # closed in cleanup_epoch / cleanup_fit
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert list_checkpoints(tmp_path / "ck")[-1].name.endswith("-e000001-b0000002.pt")  # the batch finished
    assert_same(*resume(tmp_path / "ck"), ref)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def fit_until_ctrl_c_without_a_warning(learn) -> None:
    """Fit (seed 123) until the interrupt ends it; any warning is an error."""
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyboardInterrupt):
            learn.fit(EPOCHS)


def test_ctrl_c_inside_a_batch_finishes_the_batch_saves_it_exactly(tmp_path, ref):
    learn, _ = make(CheckpointS(tmp_path), CtrlC((1, 2), "after_loss"))
    fit_until_ctrl_c_without_a_warning(learn)
    assert list_checkpoints(tmp_path)[-1].name == "ckpt-s0000000009-e000001-b0000002.pt"
    assert_same(*resume(tmp_path), ref)


def test_a_second_ctrl_c_interrupts_at_once(tmp_path):
    learn, _ = make(CheckpointS(tmp_path), CtrlC((1, 2), "after_loss", times=2))
    with pytest.warns(RuntimeWarning, match="no checkpoint written"), pytest.raises(KeyboardInterrupt):
        learn.fit(EPOCHS)
    assert learn.global_step == 8 and [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-s0000000006-e000000-end.pt"]


def InterruptInValidation():
    return CtrlC((1, 1), mode="valid")


def test_ctrl_c_in_validation_saves_the_last_training_batch(tmp_path, ref):
    learn, _ = make(CheckpointS(tmp_path), InterruptInValidation())
    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(EPOCHS)
    assert list_checkpoints(tmp_path)[-1].name == "ckpt-s0000000012-e000001-b0000005.pt"
    assert_same(*resume(tmp_path), ref)  # the validation pass of epoch 1 runs again


def test_ctrl_c_right_after_a_save_keeps_that_checkpoint_silently(tmp_path, ref):
    learn, _ = make(CheckpointS(tmp_path, every_batches=1), InterruptInValidation())
    fit_until_ctrl_c_without_a_warning(learn)
    assert list_checkpoints(tmp_path)[-1].name == "ckpt-s0000000012-e000001-b0000005.pt"
    assert_same(*resume(tmp_path, every_batches=1), ref)


def test_a_keyboard_interrupt_raised_inside_a_batch_writes_nothing_and_warns(tmp_path):
    learn, _ = make(CheckpointS(tmp_path), StopAt(1, 2, KeyboardInterrupt, "after_loss"))
    torch.manual_seed(123)
    with pytest.warns(RuntimeWarning, match="no checkpoint written"), pytest.raises(KeyboardInterrupt):
        learn.fit(EPOCHS)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-s0000000006-e000000-end.pt"]


def test_save_on_interrupt_false_writes_nothing_on_ctrl_c(tmp_path):
    learn, _ = make(CheckpointS(tmp_path, save_on_interrupt=False), StopAt(1, 2, KeyboardInterrupt, "before_batch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyboardInterrupt):
            learn.fit(EPOCHS)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-s0000000006-e000000-end.pt"]


class PoisonLoss(Subscriber):
    """Make the loss of training batch (1, 2) NaN."""

    def after_loss(self, learn) -> None:
        if learn.model.training and (learn.epoch, learn.iter) == (1, 2):
            learn.loss = learn.loss * float("nan")


def test_nan_guard_names_epoch_and_batch_and_keeps_the_last_good_checkpoint(tmp_path):
    learn, _ = make(PoisonLoss(), NanGuardS(), CheckpointS(tmp_path, every_batches=1))
    with pytest.raises(NonFiniteLossError, match="epoch 1, batch 2"):
        learn.fit(EPOCHS)
    path, state = latest_checkpoint(tmp_path)
    assert path.name.endswith("-e000001-b0000001.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_checkpoint_never_writes_nan_weights_even_when_the_guard_reads_late(tmp_path):
    learn, _ = make(PoisonLoss(), NanGuardS(check_every=4), CheckpointS(tmp_path, every_batches=1))
    with pytest.raises(NonFiniteWeightsError, match="epoch 1"):
        learn.fit(EPOCHS)
    path, state = latest_checkpoint(tmp_path)
    assert path.name.endswith("-e000001-b0000001.pt")


# ----- bad input ---------------------------------------------------------------------------------


def test_checkpoint_from_another_model_lists_the_mismatched_keys(tmp_path):
    learn, _ = make(CheckpointS(tmp_path))
    learn.fit(1)
    other = Learner(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)), tiny_dls(), F.cross_entropy)
    with pytest.raises(CheckpointError, match=r"does not fit this model: missing in checkpoint: 2.weight.*"
                                              r"not in model: 3.weight.*shape of 0.weight: model \(32, 8\), "
                                              r"checkpoint \(16, 8\)"):
        other.fit(2, resume=tmp_path)


def test_resume_from_a_corrupt_file_names_it(tmp_path):
    bad = tmp_path / "ckpt-s1.pt"
    bad.write_bytes(b"not a checkpoint")
    learn, _ = make()
    with pytest.raises(CheckpointError, match="ckpt-s1.pt"):
        learn.fit(1, resume=bad)


def test_a_loader_yielding_bare_tensors_names_the_expected_pair():
    x = torch.randn(32, 8)
    dls = type("D", (), {"train": [x[:16], x[16:]], "valid": [x[:16]]})()
    learn = Learner(nn.Linear(8, 3), dls, F.cross_entropy)
    with pytest.raises(TypeError, match=r"a batch must be a pair \(inputs, targets\).*a tensor of shape \(16, 8\)"):
        learn.fit(1)


def test_a_shape_mismatch_in_the_loss_shows_both_shapes():
    x, y = torch.randn(16, 8), torch.zeros(8, dtype=torch.long)
    dls = type("D", (), {"train": [(x, y)], "valid": []})()
    learn = Learner(nn.Linear(8, 3), dls, F.cross_entropy)
    with pytest.raises(ValueError, match="batch_size") as info:  # the loss function's own error, kept
        learn.fit(1)
    assert "preds shape (16, 3), targets shape (8,)" in "\n".join(info.value.__notes__)


# ----- Lightning -----------------------------------------------------------------------------------


def test_lightning_resumes_a_native_epoch_end_checkpoint_bitwise(tmp_path, ref):
    learn, _ = make(CheckpointS(tmp_path), StopAt(1, 0, event="before_batch"))
    torch.manual_seed(123)
    learn.fit(EPOCHS)
    learn, metrics = make()
    torch.manual_seed(999)
    learn.fit(EPOCHS, engine="lightning", resume=tmp_path)
    assert_same(learn, metrics, ref)


@pytest.mark.parametrize("every_batches, stop_at", [(2, (1, 4)), (1, (2, 5))])
def test_lightning_resumes_a_native_mid_epoch_checkpoint_bitwise_with_the_native_trace(
        tmp_path, ref, every_batches, stop_at):
    from tests.helpers import Recorder

    learn, _ = make(CheckpointS(tmp_path, every_batches=every_batches), StopAt(*stop_at))
    torch.manual_seed(123)
    learn.fit(EPOCHS)
    traces = {}
    for engine in ("native", "lightning"):
        rec = Recorder()
        learn, metrics = make(rec)
        torch.manual_seed(999)
        learn.fit(EPOCHS, engine=engine, resume=tmp_path)  # a directory: its newest checkpoint
        assert_same(learn, metrics, ref)
        traces[engine] = rec.trace
    assert traces["native"] == traces["lightning"]
    assert traces["native"][:2] == [("before_fit", "train", stop_at[0], -1), ("before_epoch", "train", stop_at[0], -1)]


def test_metric_accumulator_state_survives_a_checkpoint_file_mid_epoch(tmp_path):
    from torchmetrics.classification import MulticlassAccuracy as TMAccuracy

    from nntrain.subscribers.metrics import MetricAccumulator

    def acc():
        return MetricAccumulator({"tev": MulticlassAccuracy(), "tm": TMAccuracy(num_classes=3, average="micro"),
                                  "fn": batch_accuracy}, flush_every=2)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, generator=g), torch.randint(0, 3, (5,), generator=g), torch.rand((), generator=g))
               for _ in range(5)]
    whole, first = acc(), acc()
    for b in batches:
        whole.add(*b)
    for b in batches[:3]:  # one flush done, one batch buffered
        first.add(*b)
    torch.save(first.state_dict(), tmp_path / "acc.pt")
    resumed = acc()
    resumed.load_state_dict(torch.load(tmp_path / "acc.pt", weights_only=True))
    for b in batches[3:]:
        resumed.add(*b)
    assert resumed.compute() == whole.compute()


class LrSeen(Subscriber):
    """The lr of every optimizer step."""

    def __init__(self):
        self.lrs = []

    def after_step(self, learn):
        self.lrs.append(learn.opt.param_groups[0]["lr"])


@pytest.mark.parametrize("first, second", [("native", "native"), ("native", "lightning"),
                                           ("lightning", "lightning")])
def test_fit_lr_wins_over_the_checkpoints_lr_on_resume(tmp_path, first, second):
    import warnings

    learn, _ = make(CheckpointS(tmp_path), StopAt(1, 0, event="before_batch"), resumable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit(EPOCHS, engine=first)
        seen = LrSeen()
        learn, _ = make(CheckpointS(tmp_path), seen, resumable=True)
        learn.fit(EPOCHS, lr=0.03, resume="last", engine=second)
    assert learn.lr == 0.03 and seen.lrs and set(seen.lrs) == {0.03}
    assert learn.opt.param_groups[0]["lr"] == 0.03


def test_a_ddp_checkpoint_gives_each_rank_its_own_state_and_refuses_another_rank_count_mid_epoch():
    """`ResumePlan.read` of a Lightning checkpoint with `ranks`: rank r gets rank r's subscriber
    states and RNG; inside an epoch another number of ranks is refused, at an epoch's end rank 0's
    states serve any number."""
    from nntrain.resume import ResumePlan

    def state(iter_):
        ranks = [{"subs": {"MetricsS": {"seen": 8 * r}}, "rng": {"r": r}} for r in range(2)]
        entry = {"format": 3, "grads": [], "global_step": 6, "position": {"epoch": 1, "iter": iter_},
                 "rng": ranks[0]["rng"], "epoch_rng": None, "subs": ranks[0]["subs"], "ranks": ranks}
        return {"state_dict": {}, "nntrain": entry, "epoch": 1}

    plan = ResumePlan.read("c.ckpt", state(1), rank=1, world_size=2)
    assert plan.subs == {"MetricsS": {"seen": 8}} and plan.rng == {"r": 1}
    assert ResumePlan.read("c.ckpt", state(1)).subs == {"MetricsS": {"seen": 0}}  # no fit yet: rank 0's
    with pytest.raises(ValueError, match=r"inside epoch 1 \(after training batch 1\) by 2 rank\(s\), and this fit "
                                         r"runs 3: .* resume with 2 rank\(s\), or from a checkpoint at an epoch's end"):
        ResumePlan.read("c.ckpt", state(1), rank=0, world_size=3)
    assert ResumePlan.read("c.ckpt", state(None), rank=2, world_size=3).subs == {"MetricsS": {"seen": 0}}


def test_the_format_version_is_checked_and_format_2_keys_are_read(tmp_path):
    """A file of a newer format is refused naming the versions; format 2's `"<Class>#<k>"`
    subscriber keys are read as format 3's state keys (the class name, `#k` from the second on)."""
    from nntrain.resume import ResumePlan

    entry = {"grads": [], "global_step": 6, "position": {"epoch": 1, "iter": None}, "rng": {}, "epoch_rng": None,
             "subs": {"MetricsS#0": {"seen": 1}, "MetricsS#1": {"seen": 2}}}
    save_checkpoint({"model": {}, "optimizer": None, **entry, "format": 2}, tmp_path / "old.pt")
    assert ResumePlan.read("old.pt", load_checkpoint(tmp_path / "old.pt")).subs == \
        {"MetricsS": {"seen": 1}, "MetricsS#1": {"seen": 2}}
    save_checkpoint({"model": {}, "optimizer": None, **entry, "format": FORMAT + 1}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=rf"format {FORMAT + 1}, written by a newer nntrain .*upgrade nntrain"):
        load_checkpoint(tmp_path / "new.pt")
    save_checkpoint({"model": {}, "optimizer": None, **entry, "format": 1}, tmp_path / "older.pt")
    with pytest.raises(CheckpointError, match="format 1, which this nntrain cannot read"):
        load_checkpoint(tmp_path / "older.pt")


def test_ctrl_c_in_validation_right_after_resuming_at_a_passs_last_batch_names_the_checkpoint(tmp_path):
    learn, _ = make(CheckpointS(tmp_path / "ck", every_batches=6), CtrlC((0, 5), event="after_batch"))
    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(EPOCHS)  # the checkpoint after batch 5, the epoch's last: held, then saved there
    newest = list_checkpoints(tmp_path / "ck")[-1]
    assert newest.name.endswith("-e000000-b0000005.pt")
    resumed, _ = make(CheckpointS(tmp_path / "ck", every_batches=6), CtrlC((0, 0), mode="valid"))
    with pytest.warns(RuntimeWarning, match=rf"before this fit trained a batch: .*holds the current state \(.*{newest.name}"):
        with pytest.raises(KeyboardInterrupt):
            resumed.fit(EPOCHS, resume="last")
    assert list_checkpoints(tmp_path / "ck")[-1] == newest


def test_a_checkpoint_directory_of_none_is_named():
    with pytest.raises(TypeError, match="CheckpointS needs a directory"):
        CheckpointS(None)
