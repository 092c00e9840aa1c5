"""The learning-rate finder: the `LRFindS` subscriber, `lr_find` and its result `SuggestedLRs`,
and the LR-finder plot.

The search trains with a learning rate that grows by `mult` every training batch and records
the loss until it explodes. The suggestions are plain functions of the recorded curve
(`nntrain.lr_suggest`: fastai's valley, steepest, minimum and slide, on the smoothed curve with
fastai's trimming of its ends), so they are tested alone and shared by both engines.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nntrain import lr_suggest
from nntrain.events import (
    CancelEpochException,
    CancelFitException,
    Subscriber,
    declared,
)
from nntrain.lr_suggest import (
    METHODS,
    SUGGESTIONS,
    smooth,
    steepest,
    suggestion,
    suggestions,
    trimmed_range,
    valley,
)
from nntrain.optim import get_lr, set_lr

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn: `import nntrain` stays fast
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "smooth",
    "steepest",
    "valley",
    "suggestion",
    "SUGGESTIONS",
    "smooth_centered",
    "plot_ylim",
    "plot_lr_find",
    "LRFindS",
    "SuggestedLRs",
    "lr_find",
]


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


def plot_lr_find(
    lrs: Sequence[float],
    losses: Sequence[float],
    ax: Axes | None = None,
    suggest: bool = True,
    method: str | Sequence[str] = "valley",
    beta: float = 0.98,
    smooth_beta: float = 0.6,
    trim: bool = True,
) -> Figure:
    """Plot loss against lr (log scale), raw and smoothed, with the suggestion(s) marked.

    The y-range runs from the lowest loss to the highest loss before it (the start of the
    curve), not up to the exploded tail (`plot_ylim`). The smoothed curve is the debiased
    EMA run forward and backward (`smooth_centered`), so it does not lag behind the raw loss.
    With `trim`, the ends the suggestions leave out (`nntrain.lr_suggest.trimmed_range`) are
    shaded.

    Args:
        lrs, losses: the curve (as `LRFindS` records it).
        ax: axes to draw on; when None, a `notebook_figure` (shown once in a notebook, saved
            with nothing clipped).
        suggest: mark the suggested lr (skipped when the curve is too short).
        method: suggestion method(s), see `nntrain.lr_suggest.SUGGESTIONS`; a sequence marks each.
        beta: smoothing weight the suggestion is picked with (see `suggestion`).
        smooth_beta: smoothing weight of the drawn curve (0: the raw loss).
        trim: the suggestions leave out the curve's ends, as fastai (see `suggestion`).

    Returns:
        The figure drawn on; display it in a notebook or `fig.savefig(path)`.
    """
    methods = [method] if isinstance(method, str) else list(method)
    pairs = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    marks: list[tuple[str, float]] = []  # (method, suggested lr)
    if suggest and pairs:
        try:
            marks = [(name, lr_suggest.suggest(lrs, losses, name, beta, trim)[0]) for name in methods]
        except ValueError as exc:  # too short a curve; an unknown method still fails
            if "method" in str(exc):
                raise
    if ax is None:
        from nntrain.display import notebook_figure

        ax = notebook_figure((6, 4)).add_subplot()
        found = ", ".join(f"{name} {lr:.2e}" for name, lr in marks)
        ax.figure.set_label(f"LR finder: {len(lrs)} lrs" + (f", {found}" if found else ""))
    if pairs:
        import numpy as np

        xs, ys = zip(*pairs)
        smoothed = smooth_centered(ys, smooth_beta)
        ax.plot(xs, ys, alpha=0.35, label="loss")
        ax.plot(xs, smoothed, label="smoothed")
        span = trimmed_range(len(losses), len(pairs), trim)
        if trim and marks and len(span):
            ax.axvspan(xs[0], xs[span.start], color="0.5", alpha=0.08, linewidth=0)
            ax.axvspan(xs[span.stop - 1], xs[-1], color="0.5", alpha=0.08, linewidth=0)
        for k, (name, lr) in enumerate(marks):
            color = f"C{3 + k}"
            y = float(np.interp(math.log(lr), [math.log(x) for x in xs], smoothed))
            ax.axvline(lr, color=color, linestyle=":", linewidth=1)
            ax.plot(lr, y, "o", color=color, label=f"{name}: {lr:.2e}", zorder=3)
        ax.set_ylim(*plot_ylim(ys))
        ax.legend(loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    return ax.figure  # type: ignore[return-value]  # a SubFigure when the `ax` given lies in one


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

    def suggestion(self, method: str = "valley", beta: float = 0.98, trim: bool = True) -> float:
        """A learning rate picked from the record; see `nntrain.lr_suggest.suggestion`."""
        return suggestion(self.lrs, self.losses, method, beta, trim)

    def plot(
        self,
        ax: Axes | None = None,
        suggest: bool = True,
        method: str | Sequence[str] = "valley",
        beta: float = 0.98,
        smooth_beta: float = 0.6,
        trim: bool = True,
    ) -> Figure:
        """Plot the record; see `plot_lr_find` (which this calls with `self.lrs`, `self.losses`)."""
        return plot_lr_find(self.lrs, self.losses, ax, suggest, method, beta, smooth_beta, trim)

    def state_dict(self) -> dict[str, Any]:
        """The record: `lrs` and `losses`."""
        return {"lrs": list(self.lrs), "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the record."""
        self.lrs, self.losses = list(state["lrs"]), list(state["losses"])
        self.best = min((x for x in self.losses if math.isfinite(x)), default=math.inf)


# ----- the result ----------------------------------------------------------------------------------


class SuggestedLRs:
    """What `lr_find` returns: the recorded curve and the learning rates suggested from it.

    Like fastai's `SuggestedLRs`, its repr shows the suggestions (`valley`, `steepest`,
    `minimum`, `slide`; see `nntrain.lr_suggest`), so a terminal prints them; in a notebook it
    shows its plot with every suggestion marked, and the suggestions as its text, by itself
    (IPython's rich display; no `%matplotlib` needed). `lrs`, `losses`, `plot()` and
    `suggestion()` work as on `LRFindS`.

    Attributes:
        lrs, losses: the curve, one (lr, loss) pair per training batch of the search.
        valley, steepest, minimum, slide: the suggested lrs (None when the curve is too short).
        beta, trim: the smoothing and the trimming the suggestions were picked with.
    """

    def __init__(self, lrs: Sequence[float], losses: Sequence[float], beta: float = 0.98, trim: bool = True) -> None:
        self.lrs, self.losses = list(lrs), list(losses)
        self.beta, self.trim = beta, trim
        found = suggestions(self.lrs, self.losses, METHODS, beta, trim)
        self.valley: float | None = found["valley"]
        self.steepest: float | None = found["steepest"]
        self.minimum: float | None = found["minimum"]
        self.slide: float | None = found["slide"]

    @property
    def suggestions(self) -> dict[str, float | None]:
        """The suggested lrs by method name, in the order of `nntrain.lr_suggest.METHODS`."""
        return {method: getattr(self, method) for method in METHODS}

    def suggestion(self, method: str = "valley", beta: float | None = None, trim: bool | None = None) -> float:
        """A learning rate picked from the curve (`nntrain.lr_suggest.suggestion`), by default with
        this result's `beta` and `trim`.

        Raises:
            ValueError: an unknown method, or too short a curve.
        """
        return suggestion(
            self.lrs, self.losses, method, self.beta if beta is None else beta, self.trim if trim is None else trim
        )

    def plot(
        self,
        ax: Axes | None = None,
        suggest: bool = True,
        method: str | Sequence[str] = METHODS,
        smooth_beta: float = 0.6,
    ) -> Figure:
        """The curve with the suggestions marked (every method by default); see `plot_lr_find`."""
        return plot_lr_find(self.lrs, self.losses, ax, suggest, method, self.beta, smooth_beta, self.trim)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={'None' if lr is None else format(lr, '.3g')}" for name, lr in self.suggestions.items()
        )
        short = "" if self.valley is not None else f", too few points ({len(self.losses)} recorded)"
        return f"SuggestedLRs({shown}{short})"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """What a notebook shows: the plot as a PNG, and the repr as its text."""
        import base64

        from nntrain.display import figure_png

        png = figure_png(self.plot())
        return {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": repr(self)}


# ----- the search --------------------------------------------------------------------------------


def lr_find(
    learn: Any,
    start_lr: float = 1e-5,
    mult: float = 1.25,
    max_lr: float = 10.0,
    max_epochs: int = 100,
    engine: str = "native",
    trim: bool = True,
    **trainer_kwargs: Any,
) -> SuggestedLRs:
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
        trim: the suggestions leave out the first tenth and the last five points of the curve,
            as fastai (False: the whole curve); see `nntrain.lr_suggest`.

    Returns:
        A `SuggestedLRs`: the curve (`.lrs`, `.losses`), the suggestions (`.valley`,
        `.steepest`, `.minimum`, `.slide`), `.plot()` and `.suggestion()`.
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
    return SuggestedLRs(finder.lrs, finder.losses, trim=trim)
