"""Mixed precision, one policy for both engines: where autocast is on (`AUTOCAST_ORDER`) and
`GradScaling`, fp16 loss scaling that keeps gradients unscaled between backward and step.

Autocast covers a batch's forward pass and loss only; backward, the optimizer step and the
events after the loss run in full precision, as PyTorch's AMP guidance asks (backward under
autocast runs its ops at autocast's precision on the CPU, where the autograd engine runs in the
calling thread: attention with dropout then gets other gradients). `MixedPrecisionS` enters
autocast in `before_batch` and leaves it in `after_loss`, both at `AUTOCAST_ORDER`; under
Lightning, whose precision plugin keeps autocast on around the whole training step, the bridge
turns it off at the same point (`full_precision`) until the step returns.

One scaling algorithm for both engines: `MixedPrecisionS` runs it with its own
`torch.amp.GradScaler`, and the Lightning bridge with the scaler of Lightning's `16-mixed`
plugin, so the two give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["GradScaling", "AUTOCAST_ORDER", "full_precision"]

AUTOCAST_ORDER = -5
"""The subscriber order at which autocast starts (`before_batch`, after `DeviceS` at -10 placed
the model) and ends (`after_loss`): `after_loss` handlers ordered before it still see autocast."""


def full_precision(device_type: str) -> torch.autocast:
    """A context with autocast off on `device_type` (inside an autocast region: until it exits)."""
    return torch.autocast(device_type, enabled=False)


class GradScaling:
    """Loss scaling around a `torch.amp.GradScaler`, with unscaled gradients outside backward.

    `backward` sets the gradients already there aside (kept gradients, `MomentumLearner`'s
    `mom * grad`, or those of batches being accumulated), backpropagates the scaled loss,
    multiplies the new gradients by 1/scale (a power of two: exact) and adds the kept ones back:
    `after_backward` subscribers, clipping and accumulation see true gradients. `step` scales
    them again just before the scaler unscales them (exact again), lets the scaler step (it
    skips the step on inf/NaN) and update; a skipped step puts the kept gradients back.

    Args:
        scaler: the `torch.amp.GradScaler`.
        owned: True when this object scales the loss and steps the scaler; False when an engine's
            precision plugin does both (Lightning's `16-mixed`: in `manual_backward` and in the
            optimizer step), so only the gradients are handled here.
    """

    def __init__(self, scaler: Any, owned: bool = True) -> None:
        self.scaler = scaler
        self.owned = owned
        self._params: list[torch.Tensor] = []
        self._kept: list[torch.Tensor | None] = []

    def backward(
        self, params: Iterable[torch.Tensor], backward: Callable[[torch.Tensor], None], loss: torch.Tensor
    ) -> None:
        """`backward(scaled loss)`, leaving unscaled gradients (new plus kept) in `params`."""
        params = list(params)
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        backward(self.scaler.scale(loss) if self.owned else loss)
        inv = self.scaler._scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
        with torch.no_grad():
            new = [p.grad for p in params if p.grad is not None]
            if new:
                torch._foreach_mul_(new, inv)  # one kernel per device and dtype, as optimizers use
            both = [(p.grad, old) for p, old in zip(params, kept) if p.grad is not None and old is not None]
            if both:
                torch._foreach_add_([g for g, _ in both], [old for _, old in both])
            for p, old in zip(params, kept):
                if p.grad is None and old is not None:
                    p.grad = old.clone()
        self._params, self._kept = params, kept

    def step(self, opt: Any, engine_step: Callable[[Any], None]) -> bool:
        """Scale the gradients back, step through the scaler (or `engine_step(opt)` when the
        engine's plugin owns the scaler) and update it; False when the scaler skipped the step
        (then the gradients are those from before the batch). Reads the scaler's decision from
        the device: one host sync, besides the scaler's own inf check."""
        scaler = self.scaler
        before = scaler._scale.clone()
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            with torch.no_grad():
                torch._foreach_mul_(grads, scaler._scale)
        if self.owned:
            scaler.step(opt)
            scaler.update()
        else:
            engine_step(opt)
        if bool(scaler._scale < before):  # the update backed off: inf/NaN gradients, no step
            for p, old in zip(self._params, self._kept):
                p.grad = None if old is None else old.clone()
            return False
        return True
