"""`assert_engines_agree`: check that a learner (and its subscribers) trains to the same numbers
on the native loop and under Lightning, naming the first difference."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from nntrain.events import EVENTS
from nntrain.learner import Learner

__all__ = ["assert_engines_agree", "EngineRun"]

_BATCH_EVENTS = frozenset(
    (
        "before_batch",
        "after_predict",
        "after_loss",
        "before_backward",
        "after_backward",
        "before_step",
        "after_step",
        "after_batch",
        "cleanup_batch",
    )
)


class _Trace:
    """Records every event as `(event, mode, epoch, batch)` and each training loss with its place."""

    order = -(10**9)  # before every other subscriber

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, int | None]] = []
        self.losses: list[tuple[int, int, torch.Tensor]] = []

    def _record(self, learn: Any, event: str) -> None:
        self.events.append((event, learn.mode, learn.epoch, learn.iter if event in _BATCH_EVENTS else None))
        if event == "after_loss" and learn.mode == "train":
            self.losses.append((learn.epoch, learn.iter, learn.loss.detach().clone()))


def _handler(event: str) -> Callable[[_Trace, Any], None]:
    def handle(self: _Trace, learn: Any) -> None:
        self._record(learn, event)

    handle.__name__ = event
    return handle


for _event in EVENTS:
    setattr(_Trace, _event, _handler(_event))


class EngineRun:
    """One engine's side of `assert_engines_agree`: the learner after the fit, its event trace,
    its per-batch training losses and its `MetricsS` rows."""

    def __init__(
        self,
        engine: str,
        learn: Learner,
        trace: _Trace,
        rows: list[list[dict[str, Any]]],
        start: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.engine, self.learn, self.trace, self.rows = engine, learn, trace, rows
        self.start = start or {}  # the model's state before the fit


def _run(
    engine: str,
    make_learner: Callable[[], Learner],
    epochs: int,
    seed: int,
    fit: Callable[..., Any],
    kwargs: dict[str, Any],
) -> EngineRun:
    learn = make_learner()
    if not isinstance(learn, Learner):
        raise TypeError(f"make_learner() must return a Learner, got {type(learn).__name__}")
    start = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    trace = _Trace()
    subs = [*kwargs.pop("subs", ()), trace]
    random.seed(seed)
    torch.manual_seed(seed)
    fit(learn, epochs, subs=subs, engine=engine, **kwargs)
    rows = [list(s.history) for s in [*learn.subs, *subs] if isinstance(getattr(s, "history", None), list)]
    return EngineRun(engine, learn, trace, rows, start)


def _same(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) if atol == 0 else bool(torch.allclose(a, b, rtol=0, atol=atol, equal_nan=True))


def _compare(n: EngineRun, lt: EngineRun, atol: float) -> None:
    for name, start in n.start.items():
        other = lt.start.get(name)
        if other is None or not _same(start, other, 0):
            raise AssertionError(
                f"make_learner() built two models with different starting weights ({name!r} "
                f"differs), so the engines cannot be compared: seed inside make_learner, e.g. "
                f"torch.manual_seed(0) before building the model"
            )
    for i, (a, b) in enumerate(zip(n.trace.events, lt.trace.events)):
        if a != b:
            raise AssertionError(
                f"the event traces differ at event #{i}: native {a} vs lightning {b} (event, mode, epoch, batch)"
            )
    if len(n.trace.events) != len(lt.trace.events):
        k = min(len(n.trace.events), len(lt.trace.events))
        longer = n if len(n.trace.events) > k else lt
        raise AssertionError(
            f"the event traces differ in length ({len(n.trace.events)} native, "
            f"{len(lt.trace.events)} lightning): {longer.engine} goes on with "
            f"{longer.trace.events[k]}"
        )
    for (epoch, it, loss_n), (_, _, loss_l) in zip(n.trace.losses, lt.trace.losses):
        if not _same(loss_n, loss_l, atol):
            raise AssertionError(
                f"the training loss differs at epoch {epoch}, batch {it}: native {loss_n.tolist()} vs "
                f"lightning {loss_l.tolist()}"
            )
    for k, (rows_n, rows_l) in enumerate(zip(n.rows, lt.rows)):
        for row_n, row_l in zip(rows_n, rows_l):
            if row_n.keys() != row_l.keys() or any(
                abs(row_n[key] - row_l[key]) > atol if isinstance(row_n[key], float) else row_n[key] != row_l[key]
                for key in row_n
            ):
                raise AssertionError(
                    f"MetricsS #{k} rows differ at epoch {row_n['epoch']} ({row_n['mode']}): "
                    f"native {row_n} vs lightning {row_l}"
                )
        if len(rows_n) != len(rows_l):
            raise AssertionError(f"MetricsS #{k} has {len(rows_n)} rows natively, {len(rows_l)} under lightning")
    weights_n, weights_l = n.learn.model.state_dict(), lt.learn.model.state_dict()
    for name, a in weights_n.items():
        b = weights_l[name]
        if not _same(a, b, atol):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else "shapes differ"
            raise AssertionError(f"the final weights differ in {name!r} (max abs difference {diff})")
    if n.learn.global_step != lt.learn.global_step:
        raise AssertionError(f"global_step differs: native {n.learn.global_step} vs lightning {lt.learn.global_step}")


def assert_engines_agree(
    make_learner: Callable[[], Learner],
    epochs: int = 2,
    *,
    seed: int = 0,
    fit: Callable[..., Any] | None = None,
    lightning_kwargs: dict[str, Any] | None = None,
    atol: float = 0.0,
    **fit_kwargs: Any,
) -> tuple[EngineRun, EngineRun]:
    """Fit a learner natively and under Lightning from the same seed and check they agree.

    `make_learner()` is called once per engine and must build a fresh learner (model, loaders,
    subscribers) each time. Both fits start from `torch.manual_seed(seed)` and `random.seed(seed)`.
    Compared, in this order, bitwise (or within `atol`): the event traces (event, mode, epoch,
    batch), each training batch's loss, every `MetricsS` row, the final weights, `global_step`.

    Args:
        make_learner: builds the learner; it must seed the model itself (the seed below is set
            after it returns), else the two models differ and this says so.
        epochs: epochs to fit.
        seed: the seed both fits start from.
        fit: how to train, `fit(learn, epochs, subs=..., engine=..., **kwargs)`; default
            `Learner.fit` (e.g. `lambda learn, epochs, **kw: learn.fit_one_cycle(epochs, 0.1, **kw)`).
        lightning_kwargs: extra arguments for the Lightning fit only: Trainer options that leave
            the numbers alone (a logger, `enable_progress_bar`). An option that changes them
            (`precision=`, `accumulate_grad_batches=`) makes the runs differ: attach its
            subscriber (`MixedPrecisionS`, `GradAccumS`) in `make_learner` instead.
        atol: allowed absolute difference (0: bitwise).
        **fit_kwargs: arguments for both fits (`subs`, `lr`, `train`, `valid`).

    Returns:
        The two `EngineRun`s (native, lightning), for further checks.

    Raises:
        AssertionError: naming the first difference: the event, the epoch and batch of a loss,
            the metric row, or the tensor of the weights.
    """
    fit = fit or (lambda learn, epochs, **kw: learn.fit(epochs, **kw))
    native = _run("native", make_learner, epochs, seed, fit, dict(fit_kwargs))
    light = _run("lightning", make_learner, epochs, seed, fit, {**fit_kwargs, **(lightning_kwargs or {})})
    _compare(native, light, atol)
    return native, light
