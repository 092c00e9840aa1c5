"""Schedules as plain functions and one scheduler object: `cos_anneal`, `one_cycle`, `OneCycle`.

`SchedulerS` steps any scheduler with `step()` (a `torch.optim.lr_scheduler` or `OneCycle`);
the functions here are testable alone and shared by both engines.
"""

from __future__ import annotations

import math
from typing import Any

from nntrain.optim import check_lr_range, lr_range

__all__ = ["cos_anneal", "one_cycle", "OneCycle", "momentum_key"]


def cos_anneal(start: float, end: float, pos: float) -> float:
    """Cosine from `start` (pos 0) to `end` (pos 1)."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def one_cycle(
    pos: float,
    lr_max: float,
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e5,
    moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
) -> tuple[float, float]:
    """fastai's one-cycle `(lr, momentum)` at `pos` in [0, 1] of the steps: the lr rises from
    `lr_max/div` to `lr_max` over `pct_start`, then falls to `lr_max/div_final`, both cosine;
    the momentum moves from `moms[0]` to `moms[1]` and back to `moms[2]` the opposite way."""
    if pos < pct_start:
        p = pos / pct_start
        return cos_anneal(lr_max / div, lr_max, p), cos_anneal(moms[0], moms[1], p)
    p = (pos - pct_start) / (1 - pct_start)
    return cos_anneal(lr_max, lr_max / div_final, p), cos_anneal(moms[1], moms[2], p)


def momentum_key(group: dict[str, Any]) -> str | None:
    """The param-group entry that holds a momentum to cycle: `"betas"` (Adam's beta1),
    `"momentum"` when it is on (SGD with momentum > 0), else None."""
    if "betas" in group:
        return "betas"
    if group.get("momentum", 0) > 0:
        return "momentum"
    return None


class OneCycle:
    """A scheduler that sets every param group's lr (and momentum, see `momentum_key`) to
    `one_cycle(step / total_steps)`; `step()` advances one optimizer step. Like a
    `torch.optim.lr_scheduler`: `step`, `get_last_lr`, `state_dict`, `load_state_dict`.

    Args:
        optimizer: a torch optimizer (anything with `param_groups`).
        total_steps: optimizer steps in the whole cycle; past them the final values hold.
        lr_max: the peak lr (see `one_cycle`); a `slice(lo, hi)`: each param group cycles to its
            own peak (`nntrain.optim.lr_range`, fastai's discriminative lrs).
        pct_start: see `one_cycle`.
        div: see `one_cycle`.
        div_final: see `one_cycle`.
        moms: see `one_cycle` (None: momentum untouched).

    Raises:
        ValueError: `total_steps` < 1, `pct_start` outside [0, 1), `div`/`div_final` <= 0.
    """

    def __init__(
        self,
        optimizer: Any,
        total_steps: int,
        lr_max: float | slice,
        pct_start: float = 0.25,
        div: float = 25.0,
        div_final: float = 1e5,
        moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
    ) -> None:
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not 0 <= pct_start < 1:
            raise ValueError(f"pct_start must be in [0, 1), got {pct_start!r}")
        if isinstance(lr_max, slice):
            check_lr_range(lr_max, "lr_max")
        lr_maxes = lr_range(lr_max, len(optimizer.param_groups))
        if not (min(lr_maxes) > 0 and div > 0 and div_final > 0) or math.isinf(max(lr_maxes)):
            raise ValueError(
                f"lr_max, div and div_final must be positive and finite, got {lr_max!r}, {div!r}, {div_final!r}"
            )
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.lr_max, self.pct_start, self.div, self.div_final = lr_max, pct_start, div, div_final
        self.lr_maxes = lr_maxes  # each param group's peak
        self.moms = (*moms,) if moms is not None else None
        self.keys = [momentum_key(g) if self.moms is not None else None for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        pos = min(self.last_step / self.total_steps, 1.0)
        for group, key, lr_max in zip(self.optimizer.param_groups, self.keys, self.lr_maxes):
            lr, mom = one_cycle(pos, lr_max, self.pct_start, self.div, self.div_final, self.moms or (0, 0, 0))
            group["lr"] = lr
            if key == "betas":
                group["betas"] = (mom, *tuple(group["betas"])[1:])
            elif key == "momentum":
                group["momentum"] = mom

    def step(self) -> None:
        """Advance one optimizer step."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The lr of each param group now."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The step reached (the rest is the constructor's arguments)."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`'s step (and set the values of that step)."""
        self.last_step = int(state["last_step"])
        self._apply()
