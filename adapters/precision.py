"""The bridge's own subscribers for a run: `AutocastBoundary`, which makes a Lightning `*-mixed`
precision plugin follow `nntrain.amp`'s autocast policy (forward and loss under autocast,
backward and step in full precision), as `MixedPrecisionS` does natively."""

from __future__ import annotations

from typing import Any

import lightning as L

from nntrain.amp import AUTOCAST_ORDER, full_precision

__all__ = ["AutocastBoundary", "bridge_subscribers"]


class AutocastBoundary:
    """Turns autocast off in `after_loss` (at `AUTOCAST_ORDER`, where `MixedPrecisionS` leaves it)
    until the Lightning step returns (`leave`, called by `LearnerModule`): Lightning's mixed
    precision plugin keeps autocast on around the whole `training_step`, which here also runs
    backward, the optimizer step and their events."""

    order = AUTOCAST_ORDER
    one_rank_cancels = False  # never cancels
    reports = False

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self._off: Any = None

    def after_loss(self, learn: Any) -> None:
        """Leave autocast for the rest of the step."""
        if self._off is None:
            self._off = full_precision(self.device_type)
            self._off.__enter__()

    def leave(self) -> None:
        """End the full-precision region (inside the plugin's autocast, which exits after it)."""
        off, self._off = self._off, None
        if off is not None:
            off.__exit__(None, None, None)


def bridge_subscribers(module: Any, trainer: L.Trainer) -> list[Any]:
    """The bridge's own subscribers for this run (`module.autocast_boundary` is set for the steps)."""
    module.autocast_boundary = None
    if "mixed" in str(trainer.precision):
        module.autocast_boundary = AutocastBoundary(trainer.strategy.root_device.type)
        return [module.autocast_boundary]
    return []
