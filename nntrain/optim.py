"""Reading and setting an optimizer's learning rate, for torch optimizers and hand-written ones."""

from __future__ import annotations

from typing import Any

__all__ = ["get_lr", "set_lr"]


def get_lr(opt: Any) -> float:
    """The learning rate of `opt`: its first param group's, or its `lr` attribute."""
    if hasattr(opt, "param_groups"):
        return opt.param_groups[0]["lr"]
    return opt.lr


def set_lr(opt: Any, lr: float) -> None:
    """Set the learning rate of every param group of `opt` (or its `lr` attribute)."""
    if hasattr(opt, "param_groups"):
        for group in opt.param_groups:
            group["lr"] = lr
    else:
        opt.lr = lr
