"""Devices: `to_device` (nested batches), `default_device` and `model_device`, shared by the loop and `DeviceS`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["default_device", "to_device", "model_device"]


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
        raise ValueError(f"device must be 'auto', None, or a torch device or its name ('cpu', 'cuda', "
                         f"'cuda:1', 'mps'), got {device!r}") from exc


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
