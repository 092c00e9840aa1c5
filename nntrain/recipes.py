"""Recipes asked for by flags rather than by subscribers: `gradient_recipes` turns a
gradient-clipping value and an accumulation count (a Trainer's `gradient_clip_val` and
`accumulate_grad_batches`) into the subscribers that do them on every engine."""

from __future__ import annotations

from typing import Any

__all__ = ["gradient_recipes"]


def gradient_recipes(clip_val: float | None = None, clip_algorithm: str = "norm", accumulate: int = 1) -> list[Any]:
    """`GradClipS` for `clip_val` (by `clip_algorithm`: "norm" or "value") and `GradAccumS` for
    `accumulate` > 1; an empty list when neither is asked for.

    Raises:
        ValueError: `clip_algorithm` is neither "norm" nor "value".
    """
    from nntrain.subscribers.gradients import GradAccumS, GradClipS

    subs: list[Any] = []
    if clip_val is not None and clip_val > 0:
        if clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm={clip_algorithm!r}: use 'norm' or 'value'")
        subs.append(
            GradClipS(max_norm=float(clip_val)) if clip_algorithm == "norm" else GradClipS(max_value=float(clip_val))
        )
    if accumulate != 1:
        subs.append(GradAccumS(int(accumulate)))
    return subs
