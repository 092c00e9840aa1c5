"""Parameter groups, as fastai: a splitter cuts the model into groups (by default a body and a
head, the model's last child), `freeze_to` stops training the first groups, and the optimizer
is made over the groups for discriminative learning rates (`lr=slice(lo, hi)`, see
`nntrain.optim.lr_range`).

A frozen parameter has `requires_grad` False and no gradient, so backward leaves it without
one and the optimizer, which skips parameters without a gradient (every torch optimizer does),
does not step it: no update, no weight decay, no momentum. It stays in the optimizer, as in
fastai, so `unfreeze` needs no new optimizer. Both engines run the same backward and step, so a
frozen fit gives the same numbers natively and under Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from nntrain.optim import LR, head_lr, lr_range, set_lr

__all__ = [
    "NORM_TYPES",
    "Splitter",
    "body_head",
    "param_groups",
    "freeze_to",
    "frozen_groups",
    "make_optimizer",
    "use_lr",
]

Splitter = Callable[[nn.Module], Sequence[Any]]
"""`splitter(model)` -> the parameter groups, first to last: each an `nn.Module` (its parameters) or
an iterable of parameters; every parameter of the model in exactly one group."""

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
)
"""Normalization layers whose parameters `freeze_to(..., train_bn=True)` keeps training (fastai's
`norm_types`)."""


def body_head(model: nn.Module) -> list[list[nn.Parameter]]:
    """The default splitter: two groups, the head (the model's last child module, as for fastai's
    `Sequential(body, head)`) and the body (every other parameter).

    Raises:
        ValueError: the model has fewer than two child modules, so there is no head to split off.
    """
    children = list(model.children())
    if len(children) < 2:
        raise ValueError(
            f"{type(model).__name__} has {len(children)} child module(s): the default splitter takes "
            f"the last child as the head and the rest as the body; pass splitter=lambda m: [body, head] "
            f"(modules or parameter lists) to Learner or freeze"
        )
    head = list(children[-1].parameters())
    in_head = {id(p) for p in head}
    return [[p for p in model.parameters() if id(p) not in in_head], head]


def param_groups(model: nn.Module, splitter: Splitter | None = None) -> list[list[nn.Parameter]]:
    """The model's parameter groups from `splitter` (None: `body_head`), checked.

    Raises:
        TypeError: the splitter returned no sequence of groups, or a group holds something that
            is not a parameter.
        ValueError: no group, a parameter in two groups, or parameters in none (they would
            neither train nor freeze with the others).
    """
    raw = (splitter or body_head)(model)
    if isinstance(raw, (nn.Module, torch.Tensor)) or not isinstance(raw, Iterable):
        raise TypeError(
            f"the splitter must return a list of groups (modules or parameter lists), got {type(raw).__name__}"
        )
    groups = [list(g.parameters()) if isinstance(g, nn.Module) else list(g) for g in raw]
    if not groups:
        raise ValueError("the splitter returned no parameter group")
    names = {id(p): name for name, p in model.named_parameters()}
    seen: dict[int, int] = {}
    for i, group in enumerate(groups):
        for p in group:
            if not isinstance(p, nn.Parameter):
                raise TypeError(
                    f"parameter group {i} holds a {type(p).__name__}, not a parameter: a group is a "
                    f"module or a list of its parameters"
                )
            if id(p) in seen and seen[id(p)] != i:
                raise ValueError(
                    f"parameter {names.get(id(p), '?')!r} is in groups {seen[id(p)]} and {i}: put "
                    f"each parameter in one group"
                )
            seen[id(p)] = i
    missing = [name for name, p in model.named_parameters() if id(p) not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"the splitter left out {len(missing)} parameter(s) ({shown}): put every parameter of the model in a group"
        )
    return [list(dict.fromkeys(group)) for group in groups]  # a module's parameters once, in order


def freeze_to(learn: Any, n: int, train_bn: bool = True) -> None:
    """Freeze the parameter groups before group `n` and unfreeze the others (fastai's `freeze_to`;
    a negative `n` counts from the end: `freeze` is `freeze_to(-1)`, `unfreeze` is `freeze_to(0)`).

    Frozen parameters get `requires_grad` False and lose any gradient they hold. With
    `train_bn`, the normalization layers' parameters (`NORM_TYPES`) train in frozen groups too,
    as fastai's `train_bn=True`.

    Raises:
        ValueError: `n` outside the groups (see also `param_groups`).
    """
    groups = param_groups(learn.model, learn.splitter)
    if isinstance(n, bool) or not isinstance(n, int) or not -len(groups) <= n <= len(groups):
        raise ValueError(
            f"n must be an int from {-len(groups)} to {len(groups)} (the model has {len(groups)} "
            f"parameter groups), got {n!r}"
        )
    first_trained = n % len(groups) if n < 0 else n
    norms = _norm_params(learn.model) if train_bn else set()
    for i, group in enumerate(groups):
        for p in group:
            trains = i >= first_trained or id(p) in norms
            p.requires_grad_(trains)
            if not trains:
                p.grad = None  # a kept gradient would be stepped (MomentumLearner keeps them)


def frozen_groups(learn: Any) -> int | None:
    """How many leading parameter groups are frozen (none of their parameters trains, the
    normalization layers' aside), or None when the groups cannot be made (a model the default
    splitter cannot cut)."""
    try:
        groups = param_groups(learn.model, learn.splitter)
    except (TypeError, ValueError):
        return None
    norms = _norm_params(learn.model)
    n = 0
    while n < len(groups) and not any(p.requires_grad for p in groups[n] if id(p) not in norms):
        n += 1
    return n


def _norm_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters()}


def _grouped(learn: Any, lr: LR) -> bool:
    return isinstance(lr, slice) or learn.splitter is not None


def make_optimizer(learn: Any, lr: LR) -> Any:
    """`learn.optim_class(params, lr)`: over the model's parameters, or, when `lr` is a slice or
    the learner has a `splitter`, over one param group per parameter group, each with its lr
    from `lr_range`.

    Raises:
        TypeError: parameter groups asked of an optimizer class that does not take them.
    """
    if not _grouped(learn, lr):
        return learn.optim_class(learn.model.parameters(), lr)
    groups = param_groups(learn.model, learn.splitter)
    try:
        opt = learn.optim_class(
            [{"params": g, "lr": v} for g, v in zip(groups, lr_range(lr, len(groups)))], head_lr(lr)
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise TypeError(
            f"parameter groups (lr={lr!r} or a splitter) need an optimizer class that takes them, as "
            f"torch.optim's do; {learn.optim_class!r} failed: {exc}"
        ) from exc
    if not hasattr(opt, "param_groups"):
        raise TypeError(
            f"parameter groups (lr={lr!r} or a splitter) need an optimizer with param_groups, as "
            f"torch.optim's; {type(opt).__name__} has none: pass a torch.optim class as optim_class"
        )
    return opt


def _same_groups(opt: Any, groups: list[list[nn.Parameter]]) -> bool:
    own = [[id(p) for p in g["params"]] for g in opt.param_groups]
    return own == [[id(p) for p in g] for g in groups]


def use_lr(learn: Any, lr: LR) -> None:
    """Set `lr` on the learner's existing optimizer (`set_lr`). For a slice, an optimizer that
    does not hold the splitter's groups is first made again over them, each parameter keeping
    its state (momentum, Adam's moments) and its group's hyper-parameters.

    Raises:
        TypeError: a slice for a hand-written optimizer without param groups.
    """
    opt = learn.opt
    if isinstance(lr, slice) and hasattr(opt, "param_groups"):
        groups = param_groups(learn.model, learn.splitter)
        if not _same_groups(opt, groups):
            new = make_optimizer(learn, lr)
            old_group = {id(p): g for g in opt.param_groups for p in g["params"]}
            for group in new.param_groups:
                source = old_group.get(id(group["params"][0])) if group["params"] else None
                for key, value in (source or {}).items():
                    if key not in ("params", "lr", "initial_lr"):
                        group[key] = value
            for p, state in opt.state.items():
                new.state[p] = state
            learn.opt = new
    set_lr(learn.opt, lr)
