"""Devices: `to_device` (nested batches), `default_device`, `resolve_device`, `model_device`, and
`DeviceS`, the subscriber that places model and batches (the learner attaches one by default on a GPU)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from nntrain.events import Subscriber, declared

__all__ = ["DeviceS", "default_device", "default_placement", "model_device", "resolve_device", "to_device"]


def default_device() -> torch.device:
    """CUDA if available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """`device` as a `torch.device`: "auto" is `default_device()`, None stays None.

    Raises:
        ValueError: a name torch does not know as a device.
    """
    if device is None:
        return None
    if isinstance(device, str) and device == "auto":
        return default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be 'auto', None, or a torch device or its name ('cpu', 'cuda', "
            f"'cuda:1', 'mps'), got {device!r}"
        ) from exc


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


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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


def default_placement(model: Any, device: torch.device | None, subs: Sequence[Any]) -> list[Subscriber]:
    """A `DeviceS(device)` for a fit of `model` with `subs` attached, or none: when a subscriber
    already places the model (`role` "device placement"), `device` is None, `model` is no
    module (the engine refuses it), or model and device are both the CPU (nothing to move, and
    nothing added to the per-batch path)."""
    if (
        device is None
        or not isinstance(model, torch.nn.Module)
        or any(declared(s, "role") == "device placement" for s in subs)
    ):
        return []
    if device.type == "cpu" and model_device(model).type == "cpu":
        return []
    return [DeviceS(device)]
