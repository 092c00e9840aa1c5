"""Weights files: `Learner.save` / `Learner.load` and `SaveBestS` write and read the model's
(and optionally the optimizer's) state dict, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nntrain.checkpoint import CheckpointError, save_checkpoint
from nntrain.checkpoint_state import check_model
from nntrain.devices import model_device

__all__ = ["WEIGHTS_FORMAT", "save_weights", "load_weights"]


WEIGHTS_FORMAT = "nntrain-weights-1"
"""The `format` entry of a file written by `save_weights` (`Learner.save`, `SaveBestS`)."""

def save_weights(learn: Any, path: str | os.PathLike, with_opt: bool = True, **extra: Any) -> Path:
    """Write `learn.model`'s state dict (and the optimizer's, with `with_opt`) to `path`
    atomically, with `extra` entries (a score, an epoch); returns the path."""
    opt = learn.opt
    state = {"format": WEIGHTS_FORMAT, "model": learn.model.state_dict(),
             "optimizer": opt.state_dict() if with_opt and hasattr(opt, "state_dict") else None, **extra}
    return save_checkpoint(state, path)

def load_weights(learn: Any, path: str | os.PathLike, with_opt: bool = True, strict: bool = True) -> dict[str, Any]:
    """Load a `save_weights` file (or a native checkpoint's weights) into `learn`: the model on
    its device, and the optimizer state when the file has one and `with_opt`; returns the file's dict.

    Raises:
        CheckpointError: missing or unreadable, no `"model"` entry, or weights for another model.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=model_device(learn.model), weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no weights file at {path}") from None
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be loaded (corrupt or truncated?): {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        hint = " (a Lightning checkpoint: resume with fit(resume=...))" if isinstance(state, dict) and \
            "state_dict" in state else ""
        raise CheckpointError(f"{path} holds no model weights (no 'model' entry){hint}: write it with learn.save")
    if strict:
        check_model(learn, path, state["model"])
    learn.model.load_state_dict(state["model"], strict=strict)
    if with_opt and state.get("optimizer") is not None:
        if learn.opt is None:
            learn.create_opt()
        if hasattr(learn.opt, "load_state_dict"):
            learn.opt.load_state_dict(state["optimizer"])
    return state
