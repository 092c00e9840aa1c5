"""Device placement: `DeviceS` puts the model, the optimizer state and each batch on one device."""

from __future__ import annotations

from typing import Any

import torch

from nntrain.devices import default_device, to_device
from nntrain.events import Subscriber

__all__ = ["DeviceS", "default_device", "to_device"]


class DeviceS(Subscriber):
    """Moves the model (and optimizer state) to `device` before the fit, and each batch before it runs.

    Args:
        device: a device or its name; "auto" means CUDA if available, else the CPU.

    Native engine only: an engine that places the model and batches itself (Lightning) reads
    `engine_needs()` instead and runs on this device.
    """

    order = -10  # before other subscribers' before_batch, so they see the batch on the device
    one_rank_cancels = False  # never cancels
    role = "device placement"
    engines = ("native",)

    def __init__(self, device: str | torch.device = "auto") -> None:
        self.device = default_device() if device == "auto" else torch.device(device)
        # A non-blocking copy to the host could be read before it lands; to an accelerator it is safe.
        self.non_blocking = self.device.type != "cpu"

    def engine_needs(self) -> dict[str, Any]:
        """What an engine that does this subscriber's job itself must provide: the device."""
        return {"device": self.device}

    def before_fit(self, learn: Any) -> None:
        """Move the model's parameters in place (the optimizer keeps them) and the optimizer state."""
        learn.model.to(self.device)
        opt = learn.opt
        if isinstance(opt, torch.optim.Optimizer) and opt.state:
            # Reloading casts the state onto each parameter's device with torch's own rules
            # (for example a non-capturable Adam keeps `step` on the CPU).
            opt.load_state_dict(opt.state_dict())

    def before_batch(self, learn: Any) -> None:
        """Move the batch to the device."""
        learn.batch = to_device(learn.batch, self.device, self.non_blocking)
