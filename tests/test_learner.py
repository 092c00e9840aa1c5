"""The event loop, on both engines: event order, cancellation, ordering, errors, steps."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from nntrain.learner import (
    EVENTS,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    Learner,
    MomentumLearner,
    Subscriber,
)
from tests.helpers import BasicOptim, Recorder, tiny_dls, tiny_model

ENGINES = ("native", "lightning")

TRAIN_BATCH = ["before_batch", "after_predict", "after_loss", "before_backward", "after_backward", "before_step",
               "after_step", "after_batch", "cleanup_batch"]
VALID_BATCH = ["before_batch", "after_predict", "after_loss", "after_batch", "cleanup_batch"]


def small_learner(subs=(), cls=Learner, **kw):
    """1 epoch = 2 training batches + 1 validation batch."""
    return cls(tiny_model(), tiny_dls(n_train=32, n_valid=16, bs=16), F.cross_entropy, lr=0.1, subs=list(subs), **kw)


def events(rec: Recorder) -> list[tuple[str, str]]:
    return [(e, m) for e, m, _, _ in rec.trace]


def full_epoch() -> list[tuple[str, str]]:
    out = [("before_epoch", "train")]
    for _ in range(2):
        out += [(e, "train") for e in TRAIN_BATCH]
    out += [("after_epoch", "train"), ("cleanup_epoch", "train"), ("before_epoch", "valid")]
    out += [(e, "valid") for e in VALID_BATCH]
    out += [("after_epoch", "valid"), ("cleanup_epoch", "valid")]
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_event_sequence_of_a_fit(engine):
    rec = Recorder()
    small_learner([rec]).fit(1, engine=engine)
    expected = [("before_fit", "train"), *full_epoch(), ("after_fit", "valid"), ("cleanup_fit", "valid")]
    assert events(rec) == expected
    # epoch and batch index are current for every batch event
    assert [(e, ep, it) for e, _, ep, it in rec.trace if e == "before_batch"] == [
        ("before_batch", 0, 0), ("before_batch", 0, 1), ("before_batch", 0, 0)]


class Canceller(Subscriber):
    """Raises `exc` once, at `event` of (`mode`, batch `it`)."""

    def __init__(self, exc, event, mode="train", it=0):
        self.exc, self.event, self.mode, self.it, self.done = exc, event, mode, it, False

    def _maybe(self, learn, event):
        mode = "train" if learn.model.training else "valid"
        it_ok = self.it is None or getattr(learn, "iter", None) == self.it
        if not self.done and event == self.event and mode == self.mode and it_ok:
            self.done = True
            raise self.exc()

    def before_fit(self, learn): self._maybe(learn, "before_fit")
    def before_epoch(self, learn): self._maybe(learn, "before_epoch")
    def before_batch(self, learn): self._maybe(learn, "before_batch")
    def after_loss(self, learn): self._maybe(learn, "after_loss")
    def after_batch(self, learn): self._maybe(learn, "after_batch")
    def before_step(self, learn): self._maybe(learn, "before_step")


def T(*names):
    return [(n, "train") for n in names]


def V(*names):
    return [(n, "valid") for n in names]


VALID_EPOCH = V("before_epoch", *VALID_BATCH, "after_epoch", "cleanup_epoch")
CANCEL_CASES = {
    # CancelBatch in after_loss of batch 0: no backward/step/after_batch, cleanup_batch fires, batch 1 runs.
    "batch": (Canceller(CancelBatchException, "after_loss", it=0),
              T("before_fit", "before_epoch", "before_batch", "after_predict", "after_loss", "cleanup_batch", *TRAIN_BATCH,
                "after_epoch", "cleanup_epoch") + VALID_EPOCH + V("after_fit", "cleanup_fit")),
    # CancelStep in before_step of batch 0: no step, after_step or zero_grad; after_batch fires.
    "step": (Canceller(CancelStepException, "before_step", it=0),
             T("before_fit", "before_epoch", *TRAIN_BATCH[:6], "after_batch", "cleanup_batch", *TRAIN_BATCH,
               "after_epoch", "cleanup_epoch") + VALID_EPOCH + V("after_fit", "cleanup_fit")),
    # CancelEpoch in before_batch of batch 1: cleanup_batch and cleanup_epoch fire, validation still runs.
    "epoch": (Canceller(CancelEpochException, "before_batch", it=1),
              T("before_fit", "before_epoch", *TRAIN_BATCH, "before_batch", "cleanup_batch", "cleanup_epoch")
              + VALID_EPOCH + V("after_fit", "cleanup_fit")),
    # CancelEpoch in the validation epoch: its after_epoch does not fire, after_fit does.
    "valid_epoch": (Canceller(CancelEpochException, "after_loss", mode="valid", it=0),
                    T("before_fit", *[e for e, _ in full_epoch()[:len(TRAIN_BATCH) * 2 + 3]])
                    + V("before_epoch", "before_batch", "after_predict", "after_loss", "cleanup_batch", "cleanup_epoch",
                        "after_fit", "cleanup_fit")),
    # CancelFit in after_batch of batch 0: only the open cleanups fire, no validation, no after_fit.
    "fit": (Canceller(CancelFitException, "after_batch", it=0),
            T("before_fit", "before_epoch", *TRAIN_BATCH, "cleanup_epoch", "cleanup_fit")),
    # CancelFit in before_fit: nothing runs but cleanup_fit.
    "fit_at_start": (Canceller(CancelFitException, "before_fit", it=None), T("before_fit", "cleanup_fit")),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(CANCEL_CASES))
def test_cancel_exceptions(engine, case):
    canceller, expected = CANCEL_CASES[case]
    canceller.done = False
    rec = Recorder()
    learn = small_learner([rec, canceller])
    learn.fit(1, engine=engine)
    assert events(rec) == expected


def test_cancel_batch_before_backward_skips_the_step():
    learn = small_learner([Canceller(CancelBatchException, "after_loss", it=None)])
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, valid=False)
    assert learn.global_step == 1  # batch 0 skipped, batch 1 stepped
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


class Ordered(Subscriber):
    def __init__(self, order, log):
        self.order, self.log = order, log

    def before_fit(self, learn):
        self.log.append(self.order)


@pytest.mark.parametrize("engine", ENGINES)
def test_subscribers_run_in_order(engine):
    log = []
    learn = small_learner([Ordered(5, log), Ordered(-1, log)])
    learn.fit(1, subs=[Ordered(0, log)], engine=engine)
    assert log == [-1, 0, 5]


def test_dispatch_table_is_sorted_once_when_the_set_changes():
    log = []
    learn = small_learner([Ordered(5, log)])
    assert [h.__self__.order for h in learn.dispatch.handlers["before_fit"]] == [5]
    learn.add_subs([Ordered(1, log)])
    assert [h.__self__.order for h in learn.dispatch.handlers["before_fit"]] == [1, 5]


class Boom(Subscriber):
    def after_loss(self, learn):
        raise ValueError("boom")


@pytest.mark.parametrize("engine", ENGINES)
def test_fit_subs_are_removed_even_on_error(engine):
    rec = Recorder()
    learn = small_learner()
    with pytest.raises(ValueError, match="boom") as info:
        learn.fit(1, subs=[rec, Boom()], engine=engine)
    assert learn.subs == []
    assert learn.dispatch.handlers["after_loss"] == ()
    # the error names the subscriber and the event; the cleanups still ran
    text = "".join(traceback.format_exception(info.value))
    assert "Boom" in text and "after_loss" in text
    assert events(rec)[-3:] == T("cleanup_batch", "cleanup_epoch", "cleanup_fit")


class Typo(Subscriber):
    def after_bach(self, learn):
        pass


def test_typo_in_event_name_is_an_error_naming_the_valid_events():
    with pytest.raises(AttributeError, match="after_bach") as info:
        small_learner().fit(1, subs=[Typo()])
    for event in EVENTS:
        assert event in str(info.value)


def test_a_rejected_subscriber_is_not_left_attached():
    learn = small_learner()
    with pytest.raises(AttributeError, match="after_bach"):
        learn.fit(1, subs=[Typo()])
    with pytest.raises(AttributeError, match="after_bach"):
        learn.add_subs([Typo()])
    assert learn.subs == []
    learn.fit(1)  # the learner still trains


def test_empty_training_loader_is_a_clear_error():
    dls = tiny_dls()
    dls.train = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    learn = Learner(tiny_model(), dls, F.cross_entropy)
    with pytest.raises(ValueError, match="training loader is empty"):
        learn.fit(1)


@pytest.mark.parametrize("bad", [dict(model="not a model"), dict(dls=[1, 2]), dict(loss_fn=3), dict(optim_class=None)])
def test_wrong_types_are_rejected(bad):
    args = dict(model=tiny_model(), dls=tiny_dls(), loss_fn=F.cross_entropy, optim_class=torch.optim.SGD)
    args.update(bad)
    with pytest.raises(TypeError, match=next(iter(bad))):
        Learner(**args)


def test_bad_epochs_and_engine():
    learn = small_learner()
    with pytest.raises(ValueError, match="epochs"):
        learn.fit(0)
    with pytest.raises(ValueError, match="engine"):
        learn.fit(1, engine="jax")



@pytest.mark.parametrize("engine", ENGINES)
def test_hand_written_optimizer_matches_sgd(engine):
    """BasicOptim is plain SGD: same losses as torch.optim.SGD (wrapped for Lightning)."""
    def run(optim_class):
        rec = Recorder()
        learn = Learner(tiny_model(), tiny_dls(shuffle=False), F.cross_entropy, optim_class, lr=0.1, subs=[rec])
        learn.fit(2, engine=engine)
        return torch.stack(rec.losses)
    torch.testing.assert_close(run(BasicOptim), run(torch.optim.SGD))


def test_momentum_learner_keeps_scaled_grads():
    learn = small_learner(cls=MomentumLearner, mom=0.5)
    learn.fit(1, valid=False)
    grads = [p.grad for p in learn.model.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    before = [g.clone() for g in grads]
    learn.zero_grad()
    for b, p in zip(before, learn.model.parameters()):
        torch.testing.assert_close(p.grad, b * 0.5)


def test_optimizer_is_kept_between_fits_and_lr_updates():
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy, torch.optim.Adam, lr=1e-3)
    learn.fit(1)
    opt = learn.opt
    assert len(opt.state) > 0
    learn.fit(1, lr=1e-2)
    assert learn.opt is opt and opt.param_groups[0]["lr"] == 1e-2 and learn.lr == 1e-2


def test_infer_single_and_batch_in_eval_mode_without_grad():
    model = torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.Dropout(0.5))
    learn = Learner(model, tiny_dls(), F.cross_entropy)
    x = torch.randn(4, 8)
    out = learn.infer(x)
    assert out.shape == (4, 3) and not out.requires_grad
    torch.testing.assert_close(out, model[0](x).detach())  # dropout off: eval mode
    torch.testing.assert_close(learn.infer(x[1], single=True), out[1])
    assert model.training  # mode restored


def test_a_cancel_subclass_cancels_its_scope_and_the_bare_base_class_escapes():
    from nntrain.learner import CancelException

    class SkipRest(CancelEpochException):
        pass

    class Stop:
        def __init__(self, exc):
            self.exc = exc

        def before_batch(self, learn):
            if learn.model.training and learn.iter == 1:
                raise self.exc

    rec = Recorder()
    learn = small_learner()
    learn.fit(1, subs=[rec, Stop(SkipRest())])
    assert [e[3] for e in rec.trace if e[0] == "after_batch" and e[1] == "train"] == [0]
    with pytest.raises(CancelException):
        small_learner().fit(1, subs=[Stop(CancelException())])


class _Cancels(Subscriber):
    def __init__(self, log, exc=None):
        self.log, self.exc = log, exc

    def after_loss(self, learn):
        self.log.append(type(self).__name__)
        if self.exc is not None:
            raise self.exc


class _Quiet(_Cancels):
    one_rank_cancels = False


def test_ranks_agree_on_a_cancel_after_the_events_of_subscribers_that_may_cancel_alone():
    """`Dispatcher.agree` (set under DDP): every handler of the event runs, then the widest cancel
    of any rank is raised; events whose subscribers all declare `one_rank_cancels = False` ask nothing."""
    from types import SimpleNamespace

    from nntrain.dispatch import Dispatcher

    cancelled = []
    learn = SimpleNamespace(engine=SimpleNamespace(on_cancel=cancelled.append))
    dispatch = Dispatcher(learn)
    log, asked = [], []
    dispatch.set_subs([_Cancels(log, CancelBatchException("mine")), _Quiet(log)])
    with pytest.raises(CancelBatchException, match="mine"):  # one process: the cancel stops the event
        dispatch.publish("after_loss")
    assert log == ["_Cancels"]

    def other_rank(code):  # another rank raised nothing (0) or CancelFitException (4)
        asked.append(code)
        return max(code, other)

    dispatch.agree, other, log[:] = other_rank, 0, []
    with pytest.raises(CancelBatchException, match="mine"):  # the later handler still ran, on every rank
        dispatch.publish("after_loss")
    assert log == ["_Cancels", "_Quiet"] and asked == [2]
    other, log[:] = 4, []
    with pytest.raises(CancelFitException) as info:  # the widest wins
        dispatch.publish("after_loss")
    assert "another rank" in " ".join(info.value.__notes__)
    dispatch.set_subs([_Quiet(log), _Cancels(log)])
    dispatch.publish("before_batch")  # no handler: nothing asked
    other = 3
    with pytest.raises(CancelEpochException):  # this rank raised nothing, another CancelEpochException
        dispatch.publish("after_loss")
    assert asked == [2, 2, 0]
    dispatch.set_subs([_Quiet(log, CancelBatchException("shared"))])
    asked[:] = []
    with pytest.raises(CancelBatchException, match="shared"):  # declared rank-independent: not agreed
        dispatch.publish("after_loss")
    assert asked == []
