"""Device placement: `DeviceS` puts the model, the optimizer state and each batch on one device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nntrain.learner import Subscriber

__all__ = ["DeviceS", "default_device", "to_device"]


def default_device() -> torch.device:
    """CUDA if available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """`obj` with every tensor in it moved to `device`.

    Tensors, and tuples (named ones too), lists and mappings of them, nested; anything else is
    returned as is. Mappings come back as plain dicts.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple):
        items = [to_device(v, device, non_blocking) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [to_device(v, device, non_blocking) for v in obj]
    return obj


class DeviceS(Subscriber):
    """Moves the model (and optimizer state) to `device` before the fit, and each batch before it runs.

    Args:
        device: a device or its name; "auto" means CUDA if available, else the CPU.

    Native engine only: Lightning places the model and batches itself.
    """

    order = -10  # before other subscribers' before_batch, so they see the batch on the device
    engines = ("native",)

    def __init__(self, device: str | torch.device = "auto") -> None:
        self.device = default_device() if device == "auto" else torch.device(device)
        # A non-blocking copy to the host could be read before it lands; to an accelerator it is safe.
        self.non_blocking = self.device.type != "cpu"

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
