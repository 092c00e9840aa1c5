"""The rules a resume and a recipe set follow: a finished run stays finished, a value given to a
resuming fit is the schedule's or is refused, a recipe is attached once, and arguments are checked
when a subscriber is made (issue "Nothing lost, round three"); errors name the slip ("The first hour")."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from nntrain import (
    CheckpointError,
    CheckpointS,
    EarlyStoppingS,
    GradAccumS,
    GradClipS,
    Learner,
    MetricsS,
    MixedPrecisionS,
    SchedulerS,
)
from nntrain.adapters import to_lightning, trainer_defaults
from nntrain.testing import assert_engines_agree
from tests.helpers import tiny_dls, tiny_model

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def quiet_metrics() -> MetricsS:
    m = MetricsS()
    m.output = lambda row: None
    return m


def learner(*subs, lr=2.0):
    return Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=lr, subs=[quiet_metrics(), *subs])


# ----- a finished run stays finished ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_rerunning_the_line_after_an_early_stop_trains_nothing_and_prunes_nothing(tmp_path, engine):
    def run():
        learn = learner(EarlyStoppingS("valid/loss", patience=1), CheckpointS(tmp_path, keep=2))
        torch.manual_seed(0)
        learn.fit(20, resume="last", engine=engine)
        return learn
    first = run()
    stopped = next(s for s in first.subs if isinstance(s, EarlyStoppingS)).stopped_epoch
    assert stopped is not None and stopped < 19 and first.finished
    files = sorted(p.name for p in tmp_path.iterdir())
    with pytest.warns(RuntimeWarning, match="finished run.*nothing left to train"):
        again = run()
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # nothing written, nothing pruned
    assert again.global_step == first.global_step
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)  # the learner holds the finished run's weights


def test_early_stopping_takes_an_infinite_value_as_a_reason_to_stop_not_as_an_improvement():
    class Logs:
        pass
    es = EarlyStoppingS("valid/loss", patience=3)
    learn = Logs()
    learn.mode, learn.fit_valid, learn.epoch, learn.n_epochs, learn.finished = "valid", True, 0, 5, False
    for epoch, value in enumerate([1.0, float("-inf")]):
        learn.epoch, learn.logs = epoch, {"valid/loss": value}
        es.after_epoch(learn)
    assert es.stopped_epoch == 1 and es.tracker.best == 1.0 and learn.finished


# ----- a value given to a resuming fit -------------------------------------------------------------


def scheduled(tmp_path, every_batches=None):
    sched = SchedulerS(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5))
    return learner(sched, CheckpointS(tmp_path, every_batches=every_batches), lr=0.1)


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_a_resume_with_the_schedules_own_lr_continues_it_and_another_lr_is_refused(tmp_path, engine):
    whole = learner(SchedulerS(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)), lr=0.1)
    torch.manual_seed(0)
    whole.fit(3, lr=0.1)
    part = scheduled(tmp_path)
    torch.manual_seed(0)
    part.fit(2, lr=0.1)
    with pytest.raises(ValueError, match=r"asks lr=0\.05.*built with lr=0\.1"):
        scheduled(tmp_path).fit(3, lr=0.05, resume="last", engine=engine)
    resumed = scheduled(tmp_path)
    resumed.fit(3, lr=0.1, resume="last", engine=engine)
    assert resumed.scheduler.lrs == whole.scheduler.lrs
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_a_plateau_scheduler_steps_on_the_monitored_value_on_both_engines():
    def make():
        sched = SchedulerS(lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0))
        return Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=2.0, subs=[quiet_metrics(), sched])
    native, _ = assert_engines_agree(make, epochs=4)
    lrs = native.learn.scheduler.lrs
    assert len(lrs) == 5 and min(lrs) < lrs[0]  # one step per epoch, and it lowered the lr
    with pytest.raises(ValueError, match="steps on a metric"):
        learner(SchedulerS(lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt), "batch")).fit(1)
    with pytest.raises(ValueError, match="monitors 'valid/acc'"):
        learner(SchedulerS(lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt), monitor="valid/acc")).fit(1)


def test_a_make_sched_that_returns_no_scheduler_is_refused_before_a_step():
    learn = learner(SchedulerS(lambda opt: opt))
    with pytest.raises(TypeError, match="the optimizer itself, not a scheduler"):
        learn.fit(1)
    assert learn.global_step == 0


# ----- a recipe attached once ----------------------------------------------------------------------


@pytest.mark.parametrize("attach", [
    lambda: learner(GradAccumS(2), GradAccumS(2)),
    lambda: learner(GradClipS(1.0)).fit(1, subs=[GradClipS(2.0)]),
    lambda: learner(MixedPrecisionS(torch.bfloat16), MixedPrecisionS(torch.bfloat16)),
    lambda: learner(GradAccumS(2)).fit(1, engine="lightning", accumulate_grad_batches=2),
    lambda: learner(GradClipS(1.0)).fit(1, engine="lightning", gradient_clip_val=0.5),
], ids=["two_accumulators", "two_clippers_one_per_fit", "two_precisions", "accumulator_and_flag",
        "clipper_and_flag"])
def test_a_recipe_attached_twice_is_refused_before_a_step_naming_both(attach):
    with pytest.raises(ValueError, match=r"both do (gradient|mixed).*keep one") as info:
        attach()
    if "flag" in info.value.args[0] or "Trainer" in info.value.args[0]:
        assert "from the Trainer's" in info.value.args[0]


def test_an_own_trainer_with_a_clip_flag_and_a_clipper_is_refused_and_the_learner_still_trains():
    import lightning as L

    learn = learner(GradClipS(1.0))
    module, callbacks = to_lightning(learn)
    trainer = L.Trainer(callbacks=callbacks, gradient_clip_val=0.5, **trainer_defaults(torch.device("cpu")))
    with pytest.raises(ValueError, match=r"GradClipS \(from the Trainer's gradient_clip_val=0.5\)"):
        trainer.fit(module, learn.dls.train, learn.dls.valid)
    assert learn.global_step == 0
    learn.fit(1)
    assert learn.global_step == 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_norm="1"), "positive number"),
    (dict(max_norm=1.0, norm_type="fro"), "norm_type"),
    (dict(max_norm=1.0, norm_type=-3), "norm_type"),
    (dict(max_value=0), "positive number"),
])
def test_grad_clip_arguments_are_checked_when_it_is_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradClipS(**kwargs)
    GradClipS(max_norm=1.0, norm_type=float("inf"))


# ----- errors that point at the slip ---------------------------------------------------------------


def test_a_metric_class_instead_of_an_instance_is_named():
    from torcheval.metrics import MulticlassAccuracy

    with pytest.raises(TypeError, match=r"'accuracy' is the class MulticlassAccuracy.*MulticlassAccuracy\(\.\.\.\)"):
        MetricsS(accuracy=MulticlassAccuracy)


def test_fit_one_cycle_names_a_fractional_epoch_count():
    with pytest.raises(ValueError, match=r"epochs must be a positive int, got 2.5"):
        learner().fit_one_cycle(2.5, 0.1)


def test_assert_engines_agree_says_when_make_learner_builds_different_starting_weights():
    def unseeded():
        return Learner(torch.nn.Linear(8, 3), tiny_dls(), F.cross_entropy)
    with pytest.raises(AssertionError, match="different starting weights.*seed inside make_learner"):
        assert_engines_agree(unseeded, epochs=1)


# ----- nothing lost: dropped states, failed writes, partial loads ---------------------------------


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_a_resume_without_a_subscriber_whose_state_shapes_the_run_is_refused(tmp_path, engine):
    sched = lambda: SchedulerS(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5))  # noqa: E731
    learner(sched(), CheckpointS(tmp_path), lr=0.1).fit(1)
    with pytest.raises(CheckpointError, match=r"saved with SchedulerS.*learn.load\(path\)"):
        learner(CheckpointS(tmp_path), lr=0.1).fit(2, resume="last", engine=engine)
    renamed = sched()
    renamed.state_key = "SchedulerS"  # a subclass or rename keeps its state through state_key
    learner(renamed, CheckpointS(tmp_path), lr=0.1).fit(2, resume="last", engine=engine)
    assert len(renamed.lrs) == 13


def test_a_failed_best_weights_write_stops_the_fit_after_the_epoch_is_checkpointed(tmp_path, monkeypatch):
    import nntrain.weights as weights
    from nntrain import SaveBestS
    from nntrain.checkpoint import CheckpointError as Error

    best = tmp_path / "best.pt"
    stale = tmp_path / f".best.pt.{2 ** 22 + 7}.abcdef.tmp"  # left by a killed run (no such pid)
    stale.write_bytes(b"half")
    learn = learner(SaveBestS(best, monitor="valid/loss", mode="min"), CheckpointS(tmp_path / "ck"), lr=0.1)

    def full_disk(*args, **kwargs):
        raise Error(f"could not write checkpoint {best}: OSError: [Errno 28] No space left on device")
    monkeypatch.setattr(weights, "save_checkpoint", full_disk)
    with pytest.raises(Error, match="No space left"):
        learn.fit(3)
    assert not stale.exists() and not best.exists()
    assert [p.name for p in (tmp_path / "ck").glob("ckpt-*.pt")] == ["ckpt-s0000000006-e000000-end.pt"]


def test_load_refuses_a_file_that_would_load_nothing_or_the_wrong_optimizer(tmp_path):
    src = learner(lr=0.1)
    src.fit(1)
    path = src.save(tmp_path / "w.pt")
    from collections import OrderedDict

    other = Learner(torch.nn.Sequential(OrderedDict(lin=torch.nn.Linear(8, 3))), tiny_dls(), F.cross_entropy)
    with pytest.raises(CheckpointError, match="no weight whose name matches"):
        other.load(path, strict=False)
    narrower = Learner(torch.nn.Sequential(torch.nn.Linear(8, 3)), tiny_dls(), F.cross_entropy)
    with pytest.raises(CheckpointError, match=r"'0.weight' has shape \(16, 8\) there and \(3, 8\)"):
        narrower.load(path, strict=False)
    adam = Learner(tiny_model(), tiny_dls(), F.cross_entropy, torch.optim.Adam)
    before = [p.detach().clone() for p in adam.model.parameters()]
    with pytest.raises(CheckpointError, match=r"w.pt holds the state of another optimizer"):
        adam.load(path)
    assert all(torch.equal(a, b) for a, b in zip(before, adam.model.parameters()))  # nothing half-loaded
    adam.load(path, with_opt=False)


def test_slips_in_loaders_and_checkpoint_files_are_named_before_training(tmp_path):
    learn = learner()
    learn.dls.train = None
    with pytest.raises(TypeError, match="dls.train is None, not a loader"):
        learn.fit(1)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="cannot be loaded: not a file torch.save wrote") as info:
        learner().fit(1, resume=text)
    assert "weights_only" not in str(info.value)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "ckpt-s0000000006-e000000-end.pt").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match="skipping unusable"), \
            pytest.raises(CheckpointError, match=r'none of the 1 checkpoints in .*ck loads'):
        learner(CheckpointS(ck)).fit(1, resume="last")
