"""Mixed precision: `MixedPrecisionS` runs forward and loss under autocast, with loss scaling
for fp16 (`nntrain.amp.GradScaling`), on both engines (the policy: `nntrain.amp`)."""

from __future__ import annotations

from typing import Any

import torch

from nntrain.amp import AUTOCAST_ORDER, GradScaling
from nntrain.devices import model_device
from nntrain.events import Subscriber

__all__ = ["MixedPrecisionS"]


class MixedPrecisionS(Subscriber):
    """Autocast to `dtype` around the forward pass and the loss of every batch; for float16 also
    a `torch.amp.GradScaler` (Lightning's `16-mixed` defaults) through `GradScaling`:
    `after_backward` subscribers see unscaled gradients, a step the scaler skips (inf/NaN
    gradients) is a cancelled step (`after_step` does not fire, `global_step` stays, the
    gradients are those from before the batch), and the scaler's state goes into checkpoints.

    Backward, the step and the events after the loss run in full precision (`nntrain.amp`'s
    policy, PyTorch's AMP guidance). Under Lightning (at `precision="32-true"`) it does the same
    work, and `fit(engine="lightning", precision="16-mixed" | "bf16-mixed")` gives the same
    numbers: the bridge leaves the plugin's autocast at the same point.

    Args:
        dtype: `torch.float16` (with loss scaling) or `torch.bfloat16` (autocast only).
        init_scale: the GradScaler's initial scale.
        growth_factor: the GradScaler's growth factor.
        backoff_factor: the GradScaler's backoff factor.
        growth_interval: the GradScaler's growth interval.

    Raises:
        ValueError: another dtype; at `before_fit`, an engine already running a precision other
            than full (a Trainer's `precision=`), or a device without autocast for `dtype`.
    """

    order = AUTOCAST_ORDER  # after DeviceS (-10) placed the model; autocast opens before most before_batch handlers
    one_rank_cancels = False  # never cancels (a skipped step follows from the all-reduced gradients)
    role = "mixed precision"
    needed_on_resume = True  # its scaler state and autocast shape the run

    def __init__(
        self,
        dtype: torch.dtype = torch.float16,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
        self.dtype = dtype
        self.scaler_args: dict[str, Any] = dict(
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
        )
        self.scaler: Any = None
        self._scaling: GradScaling | None = None
        self._autocast: Any = None
        self._inside = False
        self._pending: dict[str, Any] | None = None

    def before_fit(self, learn: Any) -> None:
        """Make the autocast context and, for float16, the scaler the learner's step goes through."""
        precision = getattr(learn.engine, "precision", None)
        if precision is not None or learn.grad_scaling is not None:
            raise ValueError(
                f"the engine already runs precision {precision!r}: use either MixedPrecisionS or "
                f"the Trainer's precision= (they give the same numbers), not both"
            )
        device = model_device(learn.model)
        if not torch.amp.is_autocast_available(device.type):
            raise ValueError(f"autocast is not available on {device.type}: train there without MixedPrecisionS")
        self._autocast = torch.autocast(device.type, dtype=self.dtype)
        if self.dtype is torch.float16:
            self.scaler = torch.amp.GradScaler(device.type, **self.scaler_args)
            if self._pending is not None:
                self.scaler.load_state_dict(self._pending)
                self._pending = None
            self._scaling = GradScaling(self.scaler)
            learn.grad_scaling = self._scaling

    def before_batch(self, learn: Any) -> None:
        """Enter autocast."""
        self._autocast.__enter__()
        self._inside = True

    def after_loss(self, learn: Any) -> None:
        """Leave autocast: backward, step and later subscribers run in full precision."""
        self._leave()

    def cleanup_batch(self, learn: Any) -> None:
        """Leave autocast if the batch ended before the loss (a cancel or an error)."""
        self._leave()

    def cleanup_fit(self, learn: Any) -> None:
        """Take the scaler off the learner."""
        if self._scaling is not None and learn.grad_scaling is self._scaling:
            learn.grad_scaling = None
        self._scaling = None

    def _leave(self) -> None:
        if self._inside:
            self._inside = False
            self._autocast.__exit__(None, None, None)

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state (its scale and growth tracker); empty for bfloat16."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scaler's state (kept until `before_fit` makes the scaler, if it has not yet)."""
        if "scaler" not in state:
            return
        if self.scaler is not None and self._scaling is not None:
            self.scaler.load_state_dict(state["scaler"])
        else:
            self._pending = state["scaler"]
