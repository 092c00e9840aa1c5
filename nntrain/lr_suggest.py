"""Learning rates suggested from an LR-finder curve: fastai's four methods (`valley`, `steepest`,
`minimum`, `slide`) as plain functions, the smoothing and the trimming they run on, and
`suggestion` / `suggestions`, which `LRFindS`, `SuggestedLRs` and the CLI share on both engines.

Before a method picks a point, the curve is cut at its first non-finite loss, smoothed
(`smooth`, fastai's debiased moving average, beta 0.98) and, as fastai does, trimmed: the first
tenth of the recorded points and the last `SKIP_END` (5) are left out (`trimmed_range`). The
start is where the moving average still settles and the lr barely moves the loss; the end is
where the loss explodes and the lagging average has not caught up, so a slope measured there
points at an lr at the edge of divergence. `trim=False` looks at the whole finite curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = [
    "smooth",
    "steepest",
    "valley",
    "minimum",
    "slide",
    "SUGGESTIONS",
    "LR_FACTOR",
    "METHODS",
    "SKIP_END",
    "trimmed_range",
    "suggest",
    "suggestion",
    "suggestions",
]


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


def _check_pairs(name: str, lrs: Sequence[float], losses: Sequence[float], least: int) -> None:
    if len(losses) < least or len(lrs) != len(losses):
        raise ValueError(
            f"{name} needs {'two' if least == 2 else 'one'} or more (lr, loss) pairs of equal count, "
            f"got {len(lrs)} lrs and {len(losses)} losses"
        )


def steepest(lrs: Sequence[float], losses: Sequence[float]) -> int:
    """Index of the lr where the loss falls fastest w.r.t. log(lr) (fastai's `steep`).

    The slope of segment (i, i+1) is credited to its left end `i`, the lr that was in use when
    the fall began. Pass smoothed losses (see `smooth`); `suggestion` does.

    Raises:
        ValueError: fewer than two points.
    """
    _check_pairs("steepest", lrs, losses, 2)
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
    _check_pairs("valley", lrs, losses, 1)
    n = len(losses)
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


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> int:
    """Index of the lowest loss (the first, on a tie); fastai's `minimum` suggests a tenth of its
    lr (`LR_FACTOR`).

    Raises:
        ValueError: no points.
    """
    _check_pairs("minimum", lrs, losses, 1)
    return min(range(len(losses)), key=losses.__getitem__)


def _gradient(values: Sequence[float]) -> list[float]:
    """`numpy.gradient` with unit spacing: central differences inside, one-sided at the ends."""
    n = len(values)
    if n == 1:
        return [0.0]
    inner = [(values[i + 1] - values[i - 1]) / 2 for i in range(1, n - 1)]
    return [values[1] - values[0], *inner, values[-1] - values[-2]]


def slide(lrs: Sequence[float], losses: Sequence[float], lr_diff: int = 15, thresh: float = 0.005) -> int:
    """Index picked by fastai's interval slide rule (`slide`).

    A window of `lr_diff` points slides from the end of the curve towards its start while the
    loss's gradient (per point, as `numpy.gradient`) differs by more than `thresh` between the
    window's two ends; the pick is the window's left end where it stopped. A curve of
    `lr_diff` points or fewer is one window.

    Raises:
        ValueError: no points.
    """
    _check_pairs("slide", lrs, losses, 1)
    grad = _gradient(losses)
    right = len(losses) - 1
    left = max(right - lr_diff, 0)
    pick = left
    while left >= 0 and abs(grad[right] - grad[left]) > thresh:
        pick = left
        right, left = right - 1, left - 1
    return pick


SUGGESTIONS: dict[str, Callable[[Sequence[float], Sequence[float]], int]] = {
    "valley": valley,
    "steepest": steepest,
    "minimum": minimum,
    "slide": slide,
}
"""Suggestion methods by name; each maps (lrs, smoothed losses) to an index."""

LR_FACTOR: dict[str, float] = {"minimum": 0.1}
"""The suggested lr is `lrs[index] * LR_FACTOR.get(method, 1)`: fastai's `minimum` suggests a
tenth of the lr at the lowest loss."""

METHODS: tuple[str, ...] = tuple(SUGGESTIONS)
"""Every method, in the order a `SuggestedLRs` shows them."""

SKIP_END = 5
"""Points left out at the end of the curve before suggesting (fastai's `[:-5]`)."""


def trimmed_range(n_recorded: int, n_finite: int, trim: bool = True) -> range:
    """The indices of a curve that the suggestion methods look at.

    With `trim`, as fastai: the first `n_recorded // 10` points and the last `SKIP_END` recorded
    points are left out (fastai takes a tenth of its planned `num_it`, which is the recorded
    count for a search that runs to its end); without, the whole curve. Either way the range
    stops before the first non-finite loss (`n_finite` is the length of the finite prefix).
    """
    if not trim:
        return range(0, n_finite)
    return range(n_recorded // 10, min(n_recorded - SKIP_END, n_finite))


def _check_method(method: str) -> None:
    if method not in SUGGESTIONS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def suggest(
    lrs: Sequence[float], losses: Sequence[float], method: str = "valley", beta: float = 0.98, trim: bool = True
) -> tuple[float, int]:
    """The suggested lr and the index of the curve's point it was picked at (see `suggestion`).

    Raises:
        ValueError: an unknown method, or fewer than two finite losses in the range looked at.
    """
    _check_method(method)
    n_finite = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
    span = trimmed_range(len(losses), n_finite, trim)
    if len(span) < 2:
        cut = (
            f"; trimming left out the first {span.start} and the last {SKIP_END} of the {len(losses)} recorded "
            f"(pass trim=False to use them)"
            if trim
            else ""
        )
        raise ValueError(
            f"need two or more finite losses to suggest a learning rate, got {max(len(span), 0)}{cut}; "
            f"start the search at a lower lr or with a smaller mult"
        )
    smoothed = smooth(losses[:n_finite], beta)
    idx = span.start + SUGGESTIONS[method](lrs[span.start : span.stop], smoothed[span.start : span.stop])
    return float(lrs[idx]) * LR_FACTOR.get(method, 1.0), idx


def suggestion(
    lrs: Sequence[float], losses: Sequence[float], method: str = "valley", beta: float = 0.98, trim: bool = True
) -> float:
    """A learning rate picked from an LR-finder curve.

    The curve is cut at its first non-finite loss, smoothed with `smooth(losses, beta)` and, with
    `trim`, trimmed as fastai does (`trimmed_range`) before `method` picks a point.

    Args:
        lrs: the learning rates, increasing.
        losses: the raw loss at each lr.
        method: a key of `SUGGESTIONS`: "valley" (fastai's default), "steepest", "minimum"
            (a tenth of the lr at the lowest loss) or "slide".
        beta: smoothing weight (0: none).
        trim: leave out the first tenth and the last five points, as fastai (False: keep them).

    Raises:
        ValueError: an unknown method, or fewer than two finite losses in the range looked at.
    """
    return suggest(lrs, losses, method, beta, trim)[0]


def suggestions(
    lrs: Sequence[float],
    losses: Sequence[float],
    methods: Sequence[str] = METHODS,
    beta: float = 0.98,
    trim: bool = True,
) -> dict[str, float | None]:
    """Each method's `suggestion` by name; None for all of them when the curve is too short.

    Raises:
        ValueError: an unknown method.
    """
    for method in methods:
        _check_method(method)
    try:
        return {method: suggestion(lrs, losses, method, beta, trim) for method in methods}
    except ValueError:
        return dict.fromkeys(methods)
