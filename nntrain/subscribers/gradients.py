"""Gradient recipes: `GradClipS` clips before each optimizer step, `GradAccumS` steps every `n`
batches. Under Lightning, `gradient_clip_val` and `accumulate_grad_batches` become these."""

from __future__ import annotations

from typing import Any, cast

import torch

from nntrain.events import CancelStepException, Subscriber

__all__ = ["GradClipS", "GradAccumS"]


class GradClipS(Subscriber):
    """Clips the gradients just before each optimizer step (after every other `before_step`
    handler, as Lightning clips after `on_before_optimizer_step`): by total norm
    (`torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)`, no host sync) or, with
    `max_value`, each element (`clip_grad_value_`). Under fp16 the gradients are unscaled here.

    Raises:
        ValueError: neither or both of `max_norm` and `max_value`, one that is not a positive
            number, or a `norm_type` that is not a positive number or `inf`.
    """

    order = 900  # last before_step handler (CheckpointS at 1000 has none)
    one_rank_cancels = False  # never cancels
    role = "gradient clipping"
    needed_on_resume = True  # without it the resumed run trains differently

    def __init__(self, max_norm: float | None = None, norm_type: float = 2.0, max_value: float | None = None) -> None:
        if (max_norm is None) == (max_value is None):
            raise ValueError("give exactly one of max_norm (clip the total norm) and max_value (clip each element)")
        limit = cast(float, max_norm if max_norm is not None else max_value)  # exactly one is given
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise ValueError(f"the clipping limit must be a positive number, got {limit!r}")
        if (
            isinstance(norm_type, bool)
            or not isinstance(norm_type, (int, float))
            or not (norm_type > 0 or norm_type == float("inf"))
        ):
            raise ValueError(f"norm_type must be a positive number or float('inf') (the max norm), got {norm_type!r}")
        self.max_norm, self.norm_type, self.max_value = max_norm, norm_type, max_value

    def before_step(self, learn: Any) -> None:
        """Clip the model's gradients."""
        params = [p for p in learn.model.parameters() if p.grad is not None]
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type)
        else:
            torch.nn.utils.clip_grad_value_(params, self.max_value)  # type: ignore[arg-type]  # set: no max_norm


class GradAccumS(Subscriber):
    """An optimizer step every `n` training batches, with the loss scaled by `1/n` for backward
    (`learn.loss_grad`; `learn.loss` and the metrics stay unscaled), as Lightning's
    `accumulate_grad_batches=n`: the step comes after batches `n-1, 2n-1, ...` of each epoch and
    after the epoch's last batch (a short last group is still divided by `n`). The batches in
    between cancel their step (`CancelStepException`): no `after_step`, no `zero_grad`, so the
    gradients add up. With a loader without a length the epoch's last group is stepped only
    when full.

    Raises:
        ValueError: `n` is not a positive int.
    """

    order = -900  # first before_step handler: clipping and the like run only before real steps
    one_rank_cancels = False  # cancels from the batch count, the same on every rank
    role = "gradient accumulation"
    needed_on_resume = True  # without it the resumed run trains differently

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.n = n

    @property
    def steps_every(self) -> int:  # type: ignore[override]  # read-only here (Subscriber's is a default)
        """Training batches per optimizer step (what `fit_one_cycle` counts steps by)."""
        return self.n

    def before_backward(self, learn: Any) -> None:
        """Scale the loss backward differentiates by `1/n`."""
        if self.n != 1:
            learn.loss_grad = learn.loss_grad / self.n

    def before_step(self, learn: Any) -> None:
        """Cancel the step unless `n` batches have added up or the epoch's last batch ran."""
        done = (learn.iter + 1) % self.n == 0
        if not done and learn.iter + 1 != learn.n_batches:
            raise CancelStepException()
