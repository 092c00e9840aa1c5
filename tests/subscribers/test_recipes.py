"""Training recipes: each gives bitwise the same numbers natively, under Lightning, and through
the Lightning flag it stands for; skipped fp16 steps, accumulation boundaries, early stopping and
best-model keeping behave as Lightning's; a run with them resumes exactly."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.plugins.precision import MixedPrecision
from torcheval.metrics import MulticlassAccuracy

from nntrain import (
    CheckpointError,
    CheckpointS,
    EarlyStoppingS,
    GradAccumS,
    GradClipS,
    Learner,
    MetricsS,
    MixedPrecisionS,
    MomentumLearner,
    OneCycle,
    SaveBestS,
    SchedulerS,
    Subscriber,
)
from nntrain.adapters import to_lightning
from nntrain.schedules import one_cycle
from nntrain.subscribers.stopping import Monitor
from nntrain.testing import assert_engines_agree
from tests.helpers import tiny_dls, tiny_model

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def metrics() -> MetricsS:
    m = MetricsS(accuracy=MulticlassAccuracy())
    m.output = lambda row: None
    return m


def maker(*subs, cls=Learner, optim=torch.optim.SGD, lr=0.1, n_train=96, **kw):
    """A `make_learner` for `assert_engines_agree`: fresh model, loaders, MetricsS and `subs()`."""
    def make():
        return cls(tiny_model(), tiny_dls(n_train=n_train), F.cross_entropy, optim, lr=lr,
                   subs=[metrics(), *[s() for s in subs]], **kw)
    return make


def one_cycle_fit(lr_max=0.05):
    return lambda learn, epochs, **kw: learn.fit_one_cycle(epochs, lr_max, **kw)


RECIPES = {
    "fp16_momentum_learner": dict(make=maker(lambda: MixedPrecisionS(torch.float16), cls=MomentumLearner)),
    "bf16": dict(make=maker(lambda: MixedPrecisionS(torch.bfloat16))),
    "clip_norm": dict(make=maker(lambda: GradClipS(0.5))),
    "clip_value": dict(make=maker(lambda: GradClipS(max_value=0.01))),
    "accumulate_momentum_learner": dict(make=maker(lambda: GradAccumS(4), cls=MomentumLearner)),
    "step_lr_per_epoch": dict(make=maker(lambda: SchedulerS(lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5),
                                                            "epoch"))),
    "one_cycle_sgd_momentum": dict(make=maker(optim=lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9)),
                                   fit=one_cycle_fit()),
    "one_cycle_adam_fp16_clip_accumulate": dict(
        make=maker(lambda: MixedPrecisionS(torch.float16), lambda: GradClipS(1.0), lambda: GradAccumS(3),
                   optim=torch.optim.Adam), fit=one_cycle_fit(0.01)),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_each_recipe_is_bitwise_equal_on_both_engines(case):
    native, _ = assert_engines_agree(RECIPES[case]["make"], epochs=2, fit=RECIPES[case].get("fit"))
    assert native.learn.global_step > 0


def test_the_lightning_flags_give_the_subscribers_numbers():
    """`gradient_clip_val` (both algorithms), `accumulate_grad_batches`, `precision="bf16-mixed"`
    and the `16-mixed` plugin under the bridge equal the subscribers natively."""
    cases = [
        (GradClipS(0.5), dict(gradient_clip_val=0.5)),
        (GradClipS(max_value=0.01), dict(gradient_clip_val=0.01, gradient_clip_algorithm="value")),
        (GradAccumS(4), dict(accumulate_grad_batches=4)),
        (MixedPrecisionS(torch.bfloat16), dict(precision="bf16-mixed")),
        (MixedPrecisionS(torch.float16),
         dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])),
    ]
    for sub, flags in cases:
        subs = iter([sub])  # the native run gets the subscriber, the Lightning run only the flag
        runs = {}
        for engine, kwargs in (("native", {}), ("lightning", flags)):
            learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, subs=[metrics(), *subs])
            torch.manual_seed(0)
            learn.fit(2, engine=engine, **kwargs)
            runs[engine] = learn
        n, lt = runs["native"], runs["lightning"]
        assert n.subs[0].history == lt.subs[0].history, flags
        assert all(torch.equal(a, b) for a, b in zip(n.model.parameters(), lt.model.parameters())), flags
        assert n.global_step == lt.global_step, flags


def test_an_own_trainer_with_clip_and_accumulate_flags_runs_them_and_keeps_its_flags():
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, subs=[metrics()])
    module, callbacks = to_lightning(learn)
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, accelerator="cpu",
                        enable_model_summary=False, gradient_clip_val=0.5, accumulate_grad_batches=4)
    torch.manual_seed(0)
    trainer.fit(module)
    assert (trainer.gradient_clip_val, trainer.accumulate_grad_batches) == (0.5, 4)
    ref = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1, subs=[metrics(), GradClipS(0.5), GradAccumS(4)])
    torch.manual_seed(0)
    ref.fit(2)
    assert all(torch.equal(a, b) for a, b in zip(learn.model.parameters(), ref.model.parameters()))
    assert learn.global_step == ref.global_step == 2 * 2  # 6 batches: steps after batches 3 and 5


class PlainModule(L.LightningModule):
    """Lightning's own accumulation (automatic optimization), the reference for GradAccumS."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)


def test_grad_accum_steps_where_lightnings_automatic_accumulation_does():
    """7 batches, n=3: steps after batches 2, 5 and the epoch's last (6), each loss divided by 3."""
    dls = tiny_dls(n_train=112, shuffle=False)
    steps = []

    class Steps(Subscriber):
        def after_step(self, learn):
            steps.append((learn.epoch, learn.iter))

    learn = Learner(tiny_model(), dls, F.cross_entropy, lr=0.1, subs=[GradAccumS(3), Steps()])
    learn.fit(2, valid=False)
    assert steps == [(0, 2), (0, 5), (0, 6), (1, 2), (1, 5), (1, 6)]
    module = PlainModule(tiny_model())
    L.Trainer(max_epochs=2, accumulate_grad_batches=3, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              accelerator="cpu").fit(module, dls.train)
    assert all(torch.equal(a, b) for a, b in zip(learn.model.parameters(), module.model.parameters()))


def test_grad_accum_keeps_loss_and_metrics_unscaled():
    plain, accum = metrics(), metrics()
    torch.manual_seed(0)
    Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.0, subs=[plain]).fit(1)
    torch.manual_seed(0)
    Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.0, subs=[accum, GradAccumS(3)]).fit(1)
    assert plain.history == accum.history  # lr 0: the same model, so the same unscaled losses


class StepLog(Subscriber):
    def __init__(self):
        self.after_step_at, self.first_weights = [], None

    def after_batch(self, learn):
        if self.first_weights is None:
            self.first_weights = [p.detach().clone() for p in learn.model.parameters()]

    def after_step(self, learn):
        self.after_step_at.append(learn.epoch * learn.n_batches + learn.iter)


def test_a_skipped_fp16_step_is_cancelled_on_both_engines_and_not_scheduled():
    """A scale of 2**24 overflows fp16 gradients: the scaler skips steps (halving the scale) until
    they fit. Skipped steps fire no after_step, do not count, do not step the schedule, and leave
    the weights alone; both engines (and Lightning's plugin with the same scaler) agree."""
    def make():
        return Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1,
                       subs=[metrics(), MixedPrecisionS(torch.float16, init_scale=2.0**24), StepLog(),
                             SchedulerS(lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5))])
    native, light = assert_engines_agree(make, epochs=2)
    learn = native.learn
    log = next(s for s in learn.subs if isinstance(s, StepLog))
    sched = next(s for s in learn.subs if isinstance(s, SchedulerS))
    skipped = 12 - learn.global_step
    assert 0 < skipped < 12 and len(log.after_step_at) == learn.global_step
    assert log.after_step_at[0] == skipped  # the first applied step comes after the skipped ones
    assert len(sched.lrs) == learn.global_step + 1  # the schedule moved once per applied step
    initial = tiny_model()
    assert all(torch.equal(a, b) for a, b in zip(log.first_weights, initial.parameters()))
    mp = next(s for s in learn.subs if isinstance(s, MixedPrecisionS))
    assert mp.scaler.get_scale() == 2.0**24 / 2**skipped
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**24))
    other = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=0.1,
                    subs=[metrics(), SchedulerS(lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5))])
    torch.manual_seed(0)
    other.fit(2, engine="lightning", plugins=[plugin])
    assert other.global_step == learn.global_step
    assert all(torch.equal(a, b) for a, b in zip(other.model.parameters(), learn.model.parameters()))


def test_mixed_precision_and_a_trainer_precision_together_are_refused_before_training():
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, subs=[metrics(), MixedPrecisionS(torch.bfloat16)])
    with pytest.raises(ValueError, match="either MixedPrecisionS or the Trainer's precision"):
        learn.fit(1, engine="lightning", precision="bf16-mixed")
    assert learn.global_step == 0
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        MixedPrecisionS(torch.float64)


# ----- schedules ---------------------------------------------------------------------------------


def test_one_cycle_follows_fastais_schedule():
    assert one_cycle(0.0, 1.0) == pytest.approx((1 / 25, 0.95))
    assert one_cycle(0.25, 1.0) == pytest.approx((1.0, 0.85))
    assert one_cycle(1.0, 1.0) == pytest.approx((1e-5, 0.95))
    lr_mid, mom_mid = one_cycle(0.125, 1.0)
    assert lr_mid == pytest.approx((1 / 25 + 1) / 2) and mom_mid == pytest.approx(0.9)  # cosine halfway
    assert one_cycle(0.0, 2.0, pct_start=0.0)[0] == pytest.approx(2.0)  # no warm-up


def test_one_cycle_cycles_momentum_only_where_the_optimizer_has_one():
    params = [torch.nn.Parameter(torch.zeros(1))]
    plain = torch.optim.SGD(params, lr=0.1)
    OneCycle(plain, 10, 1.0).step()
    assert plain.param_groups[0]["momentum"] == 0
    adam = torch.optim.Adam(params, lr=0.1, betas=(0.9, 0.98))
    sched = OneCycle(adam, 10, 1.0)
    for _ in range(10):
        sched.step()
    assert adam.param_groups[0]["betas"] == pytest.approx((0.95, 0.98))
    with pytest.raises(ValueError, match="pct_start"):
        OneCycle(adam, 10, 1.0, pct_start=1.0)


def test_fit_one_cycle_spans_the_fits_steps_and_a_second_fit_starts_afresh():
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9))
    learn.fit_one_cycle(2, 0.1)
    lrs = learn.scheduler.lrs
    assert len(lrs) == 13 and lrs[0] == pytest.approx(0.1 / 25) and max(lrs) == pytest.approx(0.1, rel=0.05)
    assert lrs[-1] == pytest.approx(0.1 / 1e5)
    steplr = SchedulerS(lambda o: torch.optim.lr_scheduler.StepLR(o, 100, 0.5))
    learn.fit(1, subs=[steplr], lr=0.02)
    assert steplr.lrs[0] == pytest.approx(0.02)  # not the first fit's initial_lr
    with pytest.raises(TypeError, match="lr_max"):
        learn.fit_one_cycle(1, 0.1, lr=0.1)
    accum = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9))
    accum.fit_one_cycle(2, 0.1, subs=[GradAccumS(4)])
    assert len(accum.scheduler.lrs) == 5 and accum.scheduler.lrs[-1] == pytest.approx(0.1 / 1e5)


def test_scheduler_on_a_hand_written_optimizer_is_refused_at_fit_start():
    from tests.helpers import BasicOptim

    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, BasicOptim,
                    subs=[SchedulerS(lambda o: torch.optim.lr_scheduler.StepLR(o, 1))])
    with pytest.raises(TypeError, match="param_groups"):
        learn.fit(1)
    assert learn.global_step == 0


# ----- early stopping and the best model -----------------------------------------------------------


def test_monitor_follows_lightnings_improvement_rule():
    low = Monitor("valid/loss", "min", min_delta=0.1)
    assert low.improves(1.0) and not low.improves(0.95) and low.improves(0.85)
    high = Monitor("valid/accuracy", "max")
    assert high.improves(0.5) and not high.improves(0.5) and high.improves(0.6)
    with pytest.raises(ValueError, match="mode"):
        Monitor("x", "lowest")


def test_early_stopping_stops_after_the_same_epoch_as_lightnings_early_stopping():
    """lr 2.0 makes the validation loss rise after a few epochs."""
    def run(engine, **kwargs):
        m = metrics()
        learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=2.0, subs=[m, *kwargs.pop("subs", [])])
        torch.manual_seed(0)
        learn.fit(10, engine=engine, **kwargs)
        return m.history
    es = EarlyStoppingS("valid/loss", patience=2)
    native = run("native", subs=[es])
    lightning_es = EarlyStopping("valid/loss", patience=2)
    light = run("lightning", callbacks=[lightning_es])
    assert es.stopped_epoch is not None and es.stopped_epoch < 9
    assert native == light
    assert len(native) == 2 * (es.stopped_epoch + 1)
    assert lightning_es.stopped_epoch == es.stopped_epoch


def test_early_stopping_s_stops_both_engines_after_the_same_epoch_with_the_same_trace():
    native, light = assert_engines_agree(maker(lambda: EarlyStoppingS("valid/loss", patience=1), lr=2.0), epochs=8)
    stops = [next(s for s in run.learn.subs if isinstance(s, EarlyStoppingS)).stopped_epoch for run in (native, light)]
    assert stops[0] == stops[1] is not None and stops[0] < 7
    assert native.trace.events[-1][0] == "cleanup_fit" and "after_fit" not in [e for e, *_ in native.trace.events]


def test_early_stopping_and_save_best_refuse_a_value_nobody_logs_before_training(tmp_path):
    for sub, match in [(EarlyStoppingS("valid/acc"), "valid/acc.*logged: .*valid/accuracy"),
                       (SaveBestS(tmp_path / "b.pt", monitor="valid/loss"), "no subscriber logs"),
                       (SaveBestS(tmp_path, monitor="valid/loss"), "is a directory")]:
        subs = [sub] if match == "no subscriber logs" else [metrics(), sub]
        learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, subs=subs)
        with pytest.raises(ValueError, match=match):
            learn.fit(1)
        assert learn.global_step == 0


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_save_best_keeps_the_best_epochs_weights_and_loads_them_back(tmp_path, engine):
    weights = {}

    class EpochWeights(Subscriber):
        order = 1400

        def after_epoch(self, learn):
            if learn.mode == "valid":
                weights[learn.epoch] = {k: v.clone() for k, v in learn.model.state_dict().items()}

    m = metrics()
    best = SaveBestS(tmp_path / "best.pt", monitor="valid/loss", mode="min")
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, lr=2.0, subs=[m, EpochWeights(), best])
    torch.manual_seed(0)
    learn.fit(6, engine=engine)
    losses = [r["loss"] for r in m.rows("valid")]
    assert best.best_score == min(losses) and best.best_epoch == losses.index(min(losses))
    assert best.best_epoch < 5  # the last epoch is not the best: loading changes the weights
    best.load_best(learn)
    assert all(torch.equal(v, weights[best.best_epoch][k]) for k, v in learn.model.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # one file, no temporary left


def test_learner_save_and_load_round_trip_weights_and_optimizer(tmp_path):
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, torch.optim.Adam, lr=1e-2)
    learn.fit(1)
    learn.save(tmp_path / "m.pt")
    other = Learner(tiny_model(seed=1), tiny_dls(), F.cross_entropy, torch.optim.Adam, lr=1e-2)
    other.load(tmp_path / "m.pt")
    assert all(torch.equal(a, b) for a, b in zip(learn.model.parameters(), other.model.parameters()))
    assert other.opt.state_dict()["state"][0]["step"] == learn.opt.state_dict()["state"][0]["step"]
    with pytest.raises(CheckpointError, match="no weights file"):
        other.load(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "light.ckpt")
    with pytest.raises(CheckpointError, match="Lightning checkpoint"):
        other.load(tmp_path / "light.ckpt")
    wrong = Learner(tiny_model(n_out=4), tiny_dls(), F.cross_entropy)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        wrong.load(tmp_path / "m.pt")


# ----- resume --------------------------------------------------------------------------------------

EPOCHS = 4


class Crash(Exception):
    """The process dies here (the checkpoints written so far are what is left)."""


class StopAt(Subscriber):
    def __init__(self, epoch, iter_):
        self.at = (epoch, iter_)

    def after_batch(self, learn):
        if learn.mode == "train" and (learn.epoch, learn.iter) == self.at:
            raise Crash


def recipe_learner(*extra, resumable=False):
    """fp16 with skips and growth (scaler state), a one-cycle schedule (scheduler state) and early
    stopping that stops after epoch 2 of 4 (its count is state): min_delta 1e9 lets only the first
    epoch improve."""
    m = metrics()
    subs = [m, MixedPrecisionS(torch.float16, init_scale=2.0**30, growth_interval=3),
            SchedulerS(lambda o: OneCycle(o, EPOCHS * 6, 0.1)), EarlyStoppingS(min_delta=1e9, patience=2), *extra]
    return MomentumLearner(tiny_model(), tiny_dls(resumable=resumable), F.cross_entropy, lr=0.1, subs=subs), m


@pytest.fixture(scope="module")
def recipe_reference():
    learn, m = recipe_learner()
    torch.manual_seed(5)
    learn.fit(EPOCHS)
    assert learn.subs[3].stopped_epoch == 2 and len(m.history) == 6
    return learn, m


def assert_same_run(learn, m, ref):
    ref_learn, ref_m = ref
    assert m.history == ref_m.history
    assert all(torch.equal(a, b) for a, b in zip(learn.model.parameters(), ref_learn.model.parameters()))
    assert learn.global_step == ref_learn.global_step
    assert learn.subs[1].scaler.state_dict() == ref_learn.subs[1].scaler.state_dict()
    assert learn.subs[2].lrs == ref_learn.subs[2].lrs
    assert learn.subs[3].stopped_epoch == 2


@pytest.mark.parametrize("engine", ["native", "lightning"])
@pytest.mark.parametrize("stop_at", [(1, 3), (2, 0)])  # the newest checkpoint inside epoch 1, at its end
def test_a_run_with_scheduler_fp16_and_early_stopping_resumes_mid_epoch_bitwise(tmp_path, recipe_reference, engine,
                                                                                stop_at):
    learn, _ = recipe_learner(CheckpointS(tmp_path, every_batches=2), StopAt(*stop_at), resumable=True)
    torch.manual_seed(5)
    with pytest.raises(Crash):
        learn.fit(EPOCHS, engine=engine)
    learn, m = recipe_learner(CheckpointS(tmp_path), resumable=True)
    torch.manual_seed(99)
    learn.fit(EPOCHS, engine=engine, resume="last")
    assert_same_run(learn, m, recipe_reference)
