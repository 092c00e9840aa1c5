"""`Learner.export(path)` (here) and `load_learner(path)` (`nntrain.load`): a learner for
inference in one file, the model and what `infer` needs (the learner's class and its loss
function when they can be pickled), without the data or the optimizer, as fastai's `export` /
`load_learner`.

Loading is safe by default. The file is read with `torch.load(weights_only=True)`, which builds
nothing but tensors and plain values. The model's weights are plain tensors; the model's
structure (its class and attributes) is a pickle kept as bytes inside the file, and unpickling
can run any code the file names, so `load_learner` only does that when told the file is
trusted:

- `load_learner(path, model=Net())`: the weights go into a model you build (safe);
- `load_learner(path, trusted=True)`: the pickled model, learner class and loss function are
  unpickled (only for a file from a source you trust, as `torch.load(weights_only=False)`).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nntrain.checkpoint import atomic_write

__all__ = ["EXPORT_FORMAT", "export_learner"]

EXPORT_FORMAT = "nntrain-export-1"
"""The `format` entry of a file written by `export_learner`."""


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


class _Pickler(pickle.Pickler):
    """Pickles the model with each parameter and buffer replaced by its name: the tensors travel
    as plain tensors next to the pickle, which stays small and holds no weights twice."""

    def __init__(self, file: Any, tensors: dict[int, tuple[str, str, bool]]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors

    def persistent_id(self, obj: Any) -> Any:
        """The (kind, name, requires_grad) of a parameter or buffer of the model; None otherwise."""
        return self.tensors.get(id(obj)) if isinstance(obj, torch.Tensor) else None


class _Unpickler(pickle.Unpickler):
    """Unpickles what `_Pickler` wrote, putting the tensors back by name (a shared one once)."""

    def __init__(self, file: Any, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors
        self.made: dict[tuple[str, str, bool], torch.Tensor] = {}

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """The parameter or buffer named by `pid`."""
        pid = tuple(pid)
        if pid not in self.made:
            kind, name, requires_grad = pid
            value = self.tensors[name]
            self.made[pid] = nn.Parameter(value, requires_grad=requires_grad) if kind == "param" else value
        return self.made[pid]


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # a lambda, a local function, an object holding a lock
        return False
    return True


def export_learner(learn: Any, path: str | os.PathLike) -> Path:
    """Write `learn`'s model for inference to `path` atomically (see the module's doc); returns the path.

    The file holds the weights (every parameter and buffer, as tensors), the pickled model
    structure, the learner's class and, when it can be pickled, its loss function; not the data,
    not the optimizer.

    Raises:
        TypeError: the model cannot be pickled (a lambda or a local class in it): save the
            weights with `learn.save` and build the model in code instead.
    """
    model = learn.model
    tensors: dict[str, torch.Tensor] = {}
    ids: dict[int, tuple[str, str, bool]] = {}
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            tensors[name] = t.detach()
            ids[id(t)] = (kind, name, bool(t.requires_grad))
    loss_fn = learn.loss_fn if _picklable(learn.loss_fn) else None
    buf = io.BytesIO()
    try:
        _Pickler(buf, ids).dump({"model": model, "learner_class": type(learn), "loss_fn": loss_fn})
    except Exception as exc:
        raise TypeError(
            f"{type(model).__name__} cannot be pickled ({type(exc).__name__}: {exc}): export needs a "
            f"model made of importable classes; save the weights with learn.save(path) and build the "
            f"model in code instead"
        ) from exc
    state = {
        "format": EXPORT_FORMAT,
        "tensors": tensors,
        "state_dict": model.state_dict(),
        "model_class": _qualname(type(model)),
        "learner_class": _qualname(type(learn)),
        "loss_fn": _qualname(learn.loss_fn),
        "pickled": buf.getvalue(),
    }
    return atomic_write(path, lambda tmp: torch.save(state, tmp))
