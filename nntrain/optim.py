"""Reading and setting an optimizer's learning rate, for torch optimizers and hand-written ones,
and discriminative learning rates: `lr=slice(lo, hi)` spread over parameter groups as fastai.

A learning rate given to `fit`, `create_opt` or `OneCycle` is a number (every group gets it) or
a slice, which `lr_range` spreads over the groups: `slice(hi)` gives the last group (the head)
`hi` and every other group `hi / 10`; `slice(lo, hi)` gives the groups lrs evenly spaced on a
log scale from `lo` (the first group) to `hi` (the last), fastai's `even_mults`.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["LR", "get_lr", "set_lr", "lr_range", "check_lr_range", "head_lr"]

LR = float | slice
"""A learning rate: a number for every parameter group, or a slice spread over them (`lr_range`)."""


def _number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_lr_range(lr: Any, where: str = "lr") -> None:
    """Raise a ValueError unless `lr` is a finite number >= 0 or a slice `slice(hi)` /
    `slice(lo, hi)` with 0 < lo <= hi, both finite, and no step."""
    if isinstance(lr, slice):
        lo, hi = lr.start, lr.stop
        if lr.step is not None or not _number(hi) or hi <= 0 or (lo is not None and not (_number(lo) and 0 < lo <= hi)):
            raise ValueError(
                f"{where} as a slice must be slice(hi) or slice(lo, hi) with 0 < lo <= hi, both finite "
                f"(lo for the first parameter group, hi for the last), got {lr!r}"
            )
        return
    if not _number(lr) or lr < 0:
        raise ValueError(f"{where} must be a finite number >= 0 or a slice(lo, hi), got {lr!r}")


def lr_range(lr: LR, n_groups: int) -> list[float]:
    """The lr of each of `n_groups` parameter groups for `lr` (fastai's `lr_range`).

    A number: every group gets it. `slice(hi)`: the last group `hi`, the others `hi / 10`.
    `slice(lo, hi)`: `lo * (hi / lo) ** (i / (n_groups - 1))` for group `i` (one group: `hi`).
    """
    if not isinstance(lr, slice):
        return [lr] * n_groups
    if lr.start is None:
        return [lr.stop / 10] * (n_groups - 1) + [lr.stop]
    if n_groups == 1:
        return [lr.stop]
    step = (lr.stop / lr.start) ** (1 / (n_groups - 1))
    return [lr.start * step**i for i in range(n_groups)]


def head_lr(lr: LR) -> float:
    """The lr of the last parameter group (the head) for `lr`: the number itself, or a slice's `hi`."""
    return lr.stop if isinstance(lr, slice) else lr


def get_lr(opt: Any) -> float:
    """The learning rate of `opt`: its first param group's, or its `lr` attribute."""
    if hasattr(opt, "param_groups"):
        return opt.param_groups[0]["lr"]
    return opt.lr


def set_lr(opt: Any, lr: LR) -> None:
    """Set the learning rate of every param group of `opt` (or its `lr` attribute); a slice is
    spread over the groups (`lr_range`).

    Raises:
        TypeError: a slice for an optimizer without param groups (a hand-written one).
    """
    if hasattr(opt, "param_groups"):
        for group, value in zip(opt.param_groups, lr_range(lr, len(opt.param_groups))):
            group["lr"] = value
    elif isinstance(lr, slice):
        raise TypeError(
            f"lr={lr!r} spreads learning rates over parameter groups, which {type(opt).__name__} has "
            f"none of: pass a torch.optim optimizer class as optim_class, or a number as lr"
        )
    else:
        opt.lr = lr
