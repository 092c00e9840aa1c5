"""Learning-rate schedules: `SchedulerS` steps a scheduler after each applied optimizer step
(or each training epoch); `fit_one_cycle` is `fit` with a `OneCycle` schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from nntrain.checkpoint import ResumeRefused
from nntrain.checks import loader_length
from nntrain.events import Subscriber, declared
from nntrain.schedules import OneCycle
from nntrain.subscribers.stopping import _epoch_done, check_monitored, monitored_value

__all__ = ["SchedulerS", "fit_one_cycle"]


def _momentum(group: dict[str, Any]) -> float | None:
    if "betas" in group:
        return float(group["betas"][0])
    return float(group["momentum"]) if "momentum" in group else None


class SchedulerS(Subscriber):
    """Steps the scheduler `make_sched(learn.opt)` made at `before_fit` (any
    `torch.optim.lr_scheduler`, or `nntrain.schedules.OneCycle`).

    With `interval="batch"` (the default) it steps in `after_step`, which fires only for steps
    the optimizer really took (not for a step the fp16 scaler skipped, nor for batches
    `GradAccumS` is accumulating); with `"epoch"` after each training pass. A scheduler that
    steps on a metric (`ReduceLROnPlateau`) steps once an epoch has ended, with the value of
    `monitor` (as Lightning's `monitor`); its interval is "epoch". Each fit builds a new
    scheduler from the optimizer's lr at that point. Records the first param group's lr and
    momentum of every step in `lrs` and `moms` (`plot()` draws them); sets
    `learn.scheduler = self`. Its state goes into checkpoints.

    A resumed fit continues the saved schedule: an `lr=` given to it must be the lr the schedule
    was built with (the schedule decides each step's lr from there), else it is refused.

    Raises:
        ValueError: `interval` is neither "batch" nor "epoch"; at `before_fit`, a metric-driven
            scheduler with `interval="batch"` or a `monitor` no subscriber logs; when a resume
            loads its state, an `lr=` other than the saved schedule's.
        TypeError: `make_sched` is not callable; at `before_fit`, it returned no scheduler (the
            optimizer itself, or an object without `step`).
    """

    order = 50  # after_step: other subscribers see the lr this step used
    one_rank_cancels = False  # never cancels
    needed_on_resume = True  # its state shapes the rest of the run

    def __init__(
        self, make_sched: Callable[[Any], Any], interval: str | None = None, monitor: str = "valid/loss"
    ) -> None:
        if interval not in (None, "batch", "epoch"):
            raise ValueError(f"interval must be 'batch' or 'epoch', got {interval!r}")
        if not callable(make_sched):
            raise TypeError(f"make_sched must be a callable opt -> scheduler, got {type(make_sched).__name__}")
        self.make_sched = make_sched
        self.asked_interval, self.interval = interval, interval or "batch"
        self.monitor = monitor
        self.sched: Any = None
        self.on_metric = False  # the scheduler steps on `monitor`'s value (ReduceLROnPlateau)
        self.lrs: list[float] = []
        self.moms: list[float | None] = []
        self._fit_lrs: list[float] | None = None

    def before_fit(self, learn: Any) -> None:
        """Build the scheduler on the learner's optimizer."""
        opt = learn.opt
        if not hasattr(opt, "param_groups"):
            raise TypeError(
                f"SchedulerS needs a torch.optim optimizer (with param_groups); the learner's is "
                f"{type(opt).__name__}: pass a torch.optim class as optim_class"
            )
        for group in opt.param_groups:  # else a scheduler of a second fit starts from the first fit's lr
            group.pop("initial_lr", None)
        # the lrs this fit asked for (lr=, a slice spread over the groups), before a scheduler moves them
        self._fit_lrs = None if learn.fit_lr is None else [group["lr"] for group in opt.param_groups]
        sched = self.make_sched(opt)
        if isinstance(sched, torch.optim.Optimizer) or not callable(getattr(sched, "step", None)):
            what = "the optimizer itself" if sched is opt else type(sched).__name__
            raise TypeError(
                f"make_sched returned {what}, not a scheduler: return one made on the optimizer "
                f"it is given, e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)"
            )
        self.sched = sched
        self.on_metric = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self.on_metric:
            if self.asked_interval == "batch":
                raise ValueError(
                    f"{type(sched).__name__} steps on a metric once an epoch has ended: "
                    f"use SchedulerS(make_sched, monitor=...) without interval='batch'"
                )
            check_monitored(learn, self.monitor, "SchedulerS")
        self.interval = "epoch" if self.on_metric else (self.asked_interval or "batch")
        self.lrs, self.moms = [], []
        self._record(opt)
        learn.scheduler = self

    def after_step(self, learn: Any) -> None:
        """Step a per-batch schedule."""
        if self.interval == "batch":
            self.sched.step()
            self._record(learn.opt)

    def after_epoch(self, learn: Any) -> None:
        """Step a per-epoch schedule after a training pass (a metric-driven one once the epoch
        has ended, with the monitored value)."""
        if self.on_metric:
            if _epoch_done(learn):
                self.sched.step(monitored_value(learn, self.monitor))
                self._record(learn.opt)
        elif self.interval == "epoch" and learn.mode == "train":
            self.sched.step()
            self._record(learn.opt)

    def _record(self, opt: Any) -> None:
        group = opt.param_groups[0]
        self.lrs.append(float(group["lr"]))
        self.moms.append(_momentum(group))

    def plot(self, ax: Any = None) -> Any:
        """Plot the lr (and the momentum, on a second axis, when there is one) against the step.

        Args:
            ax: axes to draw on; when None, a `notebook_figure` (shown once in a notebook without
                `%matplotlib`, saved with nothing clipped).

        Returns:
            The matplotlib Figure drawn on.
        """
        if ax is None:
            from nntrain.display import notebook_figure

            ax = notebook_figure((6, 3.5)).add_subplot()
            peak = f", peak lr {max(self.lrs):.3g}" if self.lrs else ""
            ax.figure.set_label(f"lr schedule: {max(len(self.lrs) - 1, 0)} {self.interval} steps{peak}")
        ax.plot(range(len(self.lrs)), self.lrs, color="tab:blue", label="lr")
        ax.set_xlabel("optimizer step" if self.interval == "batch" else "epoch")
        ax.set_ylabel("learning rate", color="tab:blue")
        if any(m is not None for m in self.moms):
            twin = ax.twinx()
            twin.plot(range(len(self.moms)), self.moms, color="tab:orange", label="momentum")
            twin.set_ylabel("momentum", color="tab:orange")
        return ax.figure

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state and the records, for checkpoints."""
        if self.sched is None:
            return {}
        return {"sched": self.sched.state_dict(), "lrs": list(self.lrs), "moms": list(self.moms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the schedule from `state_dict`: the scheduler's state, and the lrs it had set
        (building a scheduler moved them to its first step)."""
        if not state:
            return
        saved = state["sched"].get("base_lrs") if isinstance(state["sched"], dict) else None
        if self._fit_lrs is not None and saved and list(saved) != self._fit_lrs:
            asked, built = _lrs_text(self._fit_lrs), _lrs_text(saved)
            raise ResumeRefused(
                f"this fit asks lr={asked}, but the schedule it resumes was built with lr={built} "
                f"and sets every step's lr from there: resume without lr= (or with lr={built}), "
                f"or start a new run"
            )
        self.sched.load_state_dict(state["sched"])
        self.lrs, self.moms = list(state["lrs"]), list(state["moms"])
        last = getattr(self.sched, "get_last_lr", None)
        groups = getattr(getattr(self.sched, "optimizer", None), "param_groups", None)
        if callable(last) and groups is not None:
            for group, lr in zip(groups, last()):
                group["lr"] = lr


def _lrs_text(lrs: list[float]) -> str:
    """One lr as itself, several (one per parameter group) as a list."""
    return str(lrs[0]) if len(set(lrs)) == 1 else str(list(lrs))


def fit_one_cycle(
    learn: Any,
    epochs: int,
    lr_max: float | slice,
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e5,
    moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
    **fit_kwargs: Any,
) -> Any:
    """`learn.fit(epochs, **fit_kwargs)` with a `SchedulerS(OneCycle(...))` attached for the fit
    (`Learner.fit_one_cycle`). The cycle spans the fit's optimizer steps: `epochs` times the
    training batches, divided by the accumulation (`GradAccumS`'s or `accumulate_grad_batches`).

    Raises:
        TypeError: `lr` in `fit_kwargs` (the cycle sets it), or a training loader without a length.
        ValueError: `epochs` is not a positive int.
    """
    if "lr" in fit_kwargs:
        raise TypeError("fit_one_cycle() sets the lr itself: pass lr_max, not lr")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r} (fit_one_cycle(epochs, lr_max))")
    train = learn.dls.train
    if loader_length(train) is None:
        raise TypeError(
            f"fit_one_cycle needs a training loader with a length (to know the steps); "
            f"{type(train).__name__} has none: use fit with a SchedulerS"
        )
    subs = list(fit_kwargs.pop("subs", ()))
    every = max(
        [int(declared(s, "steps_every")) for s in [*learn.subs, *subs]]
        + [int(fit_kwargs.get("accumulate_grad_batches", 1))]
    )
    total = epochs * math.ceil(len(train) / every)
    OneCycle(_Groups(), max(total, 1), lr_max, pct_start, div, div_final, moms)  # check the arguments now
    sched = SchedulerS(lambda opt: OneCycle(opt, total, lr_max, pct_start, div, div_final, moms))
    return learn.fit(epochs, subs=[*subs, sched], **fit_kwargs)


class _Groups:
    """An optimizer stand-in with one param group (to check `OneCycle`'s arguments)."""

    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.0}]
