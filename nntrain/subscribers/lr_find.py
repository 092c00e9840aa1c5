"""The learning-rate finder: the suggestion algorithm, the `LRFindS` subscriber and `lr_find`.

The search trains with a learning rate that grows by `mult` every training batch and records
the loss until it explodes. The suggestion functions are plain functions of the recorded
curve, so they are tested alone and shared by both engines.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nntrain.events import (
    CancelEpochException,
    CancelFitException,
    Subscriber,
    declared,
)
from nntrain.optim import get_lr, set_lr

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn: `import nntrain` stays fast
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["smooth", "steepest", "valley", "suggestion", "SUGGESTIONS", "smooth_centered", "plot_ylim", "LRFindS",
           "lr_find"]


# ----- the algorithm ---------------------------------------------------------------------------


def smooth(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """Debiased exponential moving average of `losses` (as fastai smooths its loss).

    Args:
        losses: the raw losses, in order.
        beta: weight of the running average; 0 returns the losses unchanged.
    """
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * float(loss)
        out.append(avg / (1 - beta**i))
    return out


def steepest(lrs: Sequence[float], losses: Sequence[float]) -> int:
    """Index of the lr where the loss falls fastest w.r.t. log(lr) (fastai's `steep`).

    The slope of segment (i, i+1) is credited to its left end `i`, the lr that was in use when
    the fall began. Pass smoothed losses (see `smooth`); `suggestion` does.

    Raises:
        ValueError: fewer than two points.
    """
    if len(losses) < 2 or len(lrs) != len(losses):
        raise ValueError(f"steepest needs two or more (lr, loss) pairs of equal count, got {len(lrs)} lrs "
                         f"and {len(losses)} losses")
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)]
    return min(range(len(slopes)), key=slopes.__getitem__)


def valley(lrs: Sequence[float], losses: Sequence[float]) -> int:
    """Index of the lr about halfway along the longest decreasing run of losses (fastai's `valley`).

    The run is the longest strictly decreasing subsequence of `losses` (not necessarily
    contiguous), as in fastai. Like fastai, its start is taken one index before the run's first
    point and the pick is `int(L / 3) + int(L / 6)` indices past it for a run of length `L`;
    the result is clamped at 0 where fastai would wrap to the last index.

    Raises:
        ValueError: no points.
    """
    n = len(losses)
    if n == 0 or len(lrs) != n:
        raise ValueError(f"valley needs one or more (lr, loss) pairs of equal count, got {len(lrs)} lrs "
                         f"and {n} losses")
    run = [1] * n  # run[i]: length of the longest decreasing subsequence ending at i
    end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end = i
    start = end - run[end]
    section = (end - start) / 3
    return max(0, start + int(section) + int(section / 2))


SUGGESTIONS: dict[str, Callable[[Sequence[float], Sequence[float]], int]] = {"valley": valley, "steepest": steepest}
"""Suggestion methods by name; each maps (lrs, smoothed losses) to an index."""


def _suggest_index(lrs: Sequence[float], losses: Sequence[float], method: str, beta: float) -> tuple[int, list[float]]:
    """The suggested index and the smoothed finite prefix of the curve it was picked on."""
    if method not in SUGGESTIONS:
        raise ValueError(f"method must be one of {sorted(SUGGESTIONS)}, got {method!r}")
    n = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
    if n < 2:
        raise ValueError(f"need two or more finite losses to suggest a learning rate, got {n}; "
                         f"start the search at a lower lr or with a smaller mult")
    smoothed = smooth(losses[:n], beta)
    return SUGGESTIONS[method](lrs[:n], smoothed), smoothed


def suggestion(lrs: Sequence[float], losses: Sequence[float], method: str = "valley", beta: float = 0.98) -> float:
    """A learning rate picked from an LR-finder curve.

    The curve is cut at its first non-finite loss and smoothed with `smooth(losses, beta)`
    before `method` picks a point.

    Args:
        lrs: the learning rates, increasing.
        losses: the raw loss at each lr.
        method: a key of `SUGGESTIONS`: "valley" (fastai's default) or "steepest".
        beta: smoothing weight (0: none).

    Raises:
        ValueError: an unknown method, or fewer than two finite losses.
    """
    idx, _ = _suggest_index(lrs, losses, method, beta)
    return float(lrs[idx])


# ----- plot helpers ------------------------------------------------------------------------------


def smooth_centered(losses: Sequence[float], beta: float = 0.6) -> list[float]:
    """`smooth` run forward, then backward over its result: a smoothed curve that does not lag.

    A one-sided EMA trails the curve by about `beta / (1 - beta)` points (49 at 0.98, about as
    many as a search records), so its fall and its minimum come late; the backward pass cancels
    that delay (away from the ends a straight line comes back unchanged), and the debiasing
    keeps both ends in place (a constant stays put).
    """
    return smooth(smooth(losses, beta)[::-1], beta)[::-1]


def plot_ylim(losses: Sequence[float], margin: float = 0.05) -> tuple[float, float]:
    """The y-range of an LR-finder plot: the lowest finite loss to the highest one before it.

    That is the curve's start (its plateau) down to its minimum; the exploded tail after the
    minimum runs off the top. A curve that never falls shows its whole finite range. `margin`
    (a fraction of the range) is added on both sides.

    Raises:
        ValueError: no finite loss.
    """
    finite = [float(x) for x in losses if math.isfinite(x)]
    if not finite:
        raise ValueError("plot_ylim needs one or more finite losses")
    low = min(finite)
    high = max(finite[: finite.index(low) + 1])
    if high <= low:
        high = max(finite)
    pad = margin * (high - low) if high > low else margin * max(abs(low), 1.0)
    return low - pad, high + pad


# ----- the subscriber --------------------------------------------------------------------------


def _mean_over_ranks(loss: torch.Tensor) -> torch.Tensor:
    """`loss` averaged over all ranks when distributed, so every rank takes the same decision."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        loss = loss.detach().clone()
        dist.all_reduce(loss)  # SUM, then divide: ReduceOp.AVG is NCCL-only
        loss /= dist.get_world_size()
    return loss


class LRFindS(Subscriber):
    """Multiplies the learning rate by `mult` after every training step and records (lr, loss).

    Each pair is (lr of the optimizer step taken on this batch, loss of this batch measured
    before that step), as in fastai and Lightning: the loss therefore reflects the lrs of the
    steps before it, one step behind the lr it is paired with. The fit stops when the loss is
    not finite or above `explode` times the lowest loss so far (that point is recorded first),
    or when the next lr would pass `max_lr`. Validation epochs are skipped.
    """

    one_rank_cancels = False  # decides from the loss averaged over the ranks

    def __init__(self, mult: float = 1.25, max_lr: float = 10.0, explode: float = 3.0) -> None:
        if mult <= 1:
            raise ValueError(f"mult must be > 1 so the lr grows, got {mult}")
        self.mult, self.max_lr, self.explode = mult, max_lr, explode
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.best = math.inf

    def before_fit(self, learn: Any) -> None:
        """Start a fresh record."""
        self.lrs, self.losses, self.best = [], [], math.inf

    def before_epoch(self, learn: Any) -> None:
        """Skip validation; the search goes on in the next training epoch."""
        if not learn.model.training:
            raise CancelEpochException()

    def after_loss(self, learn: Any) -> None:
        """Record (lr, loss) and stop if the loss exploded or the lr range is done."""
        if not learn.model.training:
            return
        lr = get_lr(learn.opt)
        # One host read per batch: the finder must decide now whether to go on.
        loss = float(_mean_over_ranks(learn.loss.detach()))
        self.lrs.append(lr)
        self.losses.append(loss)
        if not math.isfinite(loss) or loss > self.explode * self.best:
            raise CancelFitException()
        self.best = min(self.best, loss)
        if lr * self.mult > self.max_lr:
            raise CancelFitException()

    def after_step(self, learn: Any) -> None:
        """Raise the lr for the next batch."""
        set_lr(learn.opt, get_lr(learn.opt) * self.mult)

    def suggestion(self, method: str = "valley", beta: float = 0.98) -> float:
        """A learning rate picked from the record; see `suggestion`."""
        return suggestion(self.lrs, self.losses, method, beta)

    def plot(self, ax: Axes | None = None, suggest: bool = True, method: str | Sequence[str] = "valley",
             beta: float = 0.98, smooth_beta: float = 0.6) -> Figure:
        """Plot loss against lr (log scale), raw and smoothed, with the suggestion(s) marked.

        The y-range runs from the lowest loss to the highest loss before it (the start of the
        curve), not up to the exploded tail (`plot_ylim`). The smoothed curve is the debiased
        EMA run forward and backward (`smooth_centered`), so it does not lag behind the raw loss.

        Args:
            ax: axes to draw on; when None, a `notebook_figure` (shown once in a notebook, saved
                with nothing clipped).
            suggest: mark the suggested lr (skipped when the record is too short).
            method: suggestion method(s), see `SUGGESTIONS`; a sequence marks each.
            beta: smoothing weight the suggestion is picked with (see `suggestion`).
            smooth_beta: smoothing weight of the drawn curve (0: the raw loss).

        Returns:
            The figure drawn on; display it in a notebook or `fig.savefig(path)`.
        """
        methods = [method] if isinstance(method, str) else list(method)
        pairs = [(lr, loss) for lr, loss in zip(self.lrs, self.losses) if math.isfinite(loss)]
        prefix = next((i for i, loss in enumerate(self.losses) if not math.isfinite(loss)), len(self.losses))
        marks = []  # (method, index): in the finite prefix, so it indexes `pairs` too
        if suggest and prefix >= 2:
            marks = [(name, _suggest_index(self.lrs, self.losses, name, beta)[0]) for name in methods]
        if ax is None:
            from nntrain.display import notebook_figure

            ax = notebook_figure((6, 4)).add_subplot()
            found = ", ".join(f"{name} {self.lrs[idx]:.2e}" for name, idx in marks)
            ax.figure.set_label(f"LR finder: {len(self.lrs)} lrs" + (f", {found}" if found else ""))
        if pairs:
            lrs, losses = zip(*pairs)
            smoothed = smooth_centered(losses, smooth_beta)
            ax.plot(lrs, losses, alpha=0.35, label="loss")
            ax.plot(lrs, smoothed, label="smoothed")
            for k, (name, idx) in enumerate(marks):
                color = f"C{3 + k}"
                ax.axvline(lrs[idx], color=color, linestyle=":", linewidth=1)
                ax.plot(lrs[idx], smoothed[idx], "o", color=color, label=f"{name}: {lrs[idx]:.2e}", zorder=3)
            ax.set_ylim(*plot_ylim(losses))
            ax.legend(loc="best")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        return ax.figure  # type: ignore[return-value]  # a SubFigure when the `ax` given lies in one

    def state_dict(self) -> dict[str, Any]:
        """The record: `lrs` and `losses`."""
        return {"lrs": list(self.lrs), "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the record."""
        self.lrs, self.losses = list(state["lrs"]), list(state["losses"])
        self.best = min((x for x in self.losses if math.isfinite(x)), default=math.inf)


# ----- the search --------------------------------------------------------------------------------


def lr_find(
    learn: Any,
    start_lr: float = 1e-5,
    mult: float = 1.25,
    max_lr: float = 10.0,
    max_epochs: int = 100,
    engine: str = "native",
    **trainer_kwargs: Any,
) -> LRFindS:
    """Run an `LRFindS` search on `learn`, then put it back exactly as it was.

    The weights, gradients, optimizer (its state dict, or its `lr` for a hand-written one, or
    its absence), `learn.lr`, `learn.global_step` and the model's train/eval mode are restored
    even when the search fails. Reporting subscribers (`reports = True`: metrics, progress,
    TensorBoard) are detached during the search and attached again afterwards. The random
    number generators are not restored: the search moves them on, as any fit does.

    Args:
        learn: the learner to search with.
        start_lr: lr of the first batch.
        mult: factor between the lrs of consecutive batches.
        max_lr: the search stops before the lr passes it.
        max_epochs: bound on the training epochs the search may run.
        engine: "native" or "lightning"; `trainer_kwargs` go to the Trainer.

    Returns:
        The finder, with `.lrs`, `.losses`, `.plot()` and `.suggestion()`.
    """
    finder = LRFindS(mult=mult, max_lr=max_lr)
    model = learn.model
    weights = copy.deepcopy(model.state_dict())
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    was_training = model.training
    opt = learn.opt
    opt_state = copy.deepcopy(opt.state_dict()) if callable(getattr(opt, "state_dict", None)) else None
    opt_lr = get_lr(opt) if opt is not None and opt_state is None else None
    lr, global_step = learn.lr, learn.global_step
    subs = list(learn.subs)
    learn.remove_subs([sub for sub in subs if declared(sub, "reports")])  # no rows, bars or logs from the search
    try:
        learn.fit(max_epochs, valid=False, subs=[finder], lr=start_lr, engine=engine, **trainer_kwargs)
    finally:
        learn.remove_subs(list(learn.subs))
        learn.add_subs(subs)
        model.load_state_dict(weights)
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        model.train(was_training)
        learn.opt = opt
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        elif opt is not None:
            set_lr(opt, opt_lr)  # type: ignore[arg-type]  # read above exactly when this branch runs
        learn.lr, learn.global_step = lr, global_step
    return finder
