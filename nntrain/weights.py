"""Weights files: `Learner.save` / `Learner.load` and `SaveBestS` write and read the model's
(and optionally the optimizer's) state dict, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nntrain.checkpoint import CheckpointError, save_checkpoint
from nntrain.checkpoint_state import check_model, check_optimizer
from nntrain.devices import model_device

__all__ = ["WEIGHTS_FORMAT", "save_weights", "load_weights"]


WEIGHTS_FORMAT = "nntrain-weights-1"
"""The `format` entry of a file written by `save_weights` (`Learner.save`, `SaveBestS`)."""


def save_weights(learn: Any, path: str | os.PathLike, with_opt: bool = True, **extra: Any) -> Path:
    """Write `learn.model`'s state dict (and the optimizer's, with `with_opt`) to `path`
    atomically, with `extra` entries (a score, an epoch); returns the path."""
    opt = learn.opt
    state = {
        "format": WEIGHTS_FORMAT,
        "model": learn.model.state_dict(),
        "optimizer": opt.state_dict() if with_opt and hasattr(opt, "state_dict") else None,
        **extra,
    }
    return save_checkpoint(state, path)


def load_weights(learn: Any, path: str | os.PathLike, with_opt: bool = True, strict: bool = True) -> dict[str, Any]:
    """Load a `save_weights` file (or a native checkpoint's weights) into `learn`: the model on
    its device, and the optimizer state when the file has one and `with_opt`; returns the file's dict.

    With `strict=False` the tensors whose names match are loaded and the others left as they
    are (fine-tuning a model with a new head); a file that matches none is refused.

    Raises:
        CheckpointError: missing or unreadable, no `"model"` entry, weights for another model
            (with `strict=False`: no matching name, or a matching name of another shape), or an
            optimizer state for another optimizer or other parameters.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=model_device(learn.model), weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no weights file at {path}") from None
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be loaded (corrupt or truncated?): {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        hint = (
            " (a Lightning checkpoint: resume with fit(resume=...))"
            if isinstance(state, dict) and "state_dict" in state
            else ""
        )
        raise CheckpointError(f"{path} holds no model weights (no 'model' entry){hint}: write it with learn.save")
    if strict:
        check_model(learn, path, state["model"])
    else:
        _check_partial(learn.model, path, state["model"])
    load_opt = with_opt and state.get("optimizer") is not None
    if load_opt:  # checked before anything is loaded: a refused file changes nothing
        if learn.opt is None:
            learn.create_opt()
        check_optimizer(learn, path, state["optimizer"])
    learn.model.load_state_dict(state["model"], strict=strict)
    if load_opt and hasattr(learn.opt, "load_state_dict"):
        learn.opt.load_state_dict(state["optimizer"])
    return state


def _check_partial(model: torch.nn.Module, path: Path, saved: dict[str, Any]) -> None:
    """For `strict=False`: at least one saved name matches, and every match has the same shape."""
    own = model.state_dict()
    common = [k for k in saved if k in own]
    if not common:
        raise CheckpointError(
            f"{path} has no weight whose name matches this model's (it has "
            f"{', '.join(list(saved)[:3])}, ...; the model {', '.join(list(own)[:3])}, ...): "
            f"nothing would be loaded"
        )
    for k in common:
        if tuple(saved[k].shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{path}: {k!r} has shape {tuple(saved[k].shape)} there and "
                f"{tuple(own[k].shape)} in this model; strict=False skips missing names, "
                f"not other shapes"
            )
