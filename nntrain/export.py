"""`Learner.export(path)` and `load_learner(path)`: a learner for inference in one file, the model
and what `infer` needs (the learner's class and its loss function when they can be pickled),
without the data or the optimizer, as fastai's `export` / `load_learner`.

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

from nntrain.checkpoint import atomic_write, read_checkpoint

__all__ = ["EXPORT_FORMAT", "export_learner", "load_learner", "NoData"]

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
        raise TypeError(f"{type(model).__name__} cannot be pickled ({type(exc).__name__}: {exc}): export needs a "
                        f"model made of importable classes; save the weights with learn.save(path) and build the "
                        f"model in code instead") from exc
    state = {"format": EXPORT_FORMAT, "tensors": tensors, "state_dict": model.state_dict(),
             "model_class": _qualname(type(model)), "learner_class": _qualname(type(learn)),
             "loss_fn": _qualname(learn.loss_fn), "pickled": buf.getvalue()}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


class NoData:
    """The loaders of a learner made by `load_learner`: it has none, and says so when a fit or
    an evaluation asks for one. Set `learn.dls` to train or evaluate it again."""

    def __init__(self) -> None:
        self.train = self.valid = self

    def _missing(self) -> ValueError:
        return ValueError("this learner was made by load_learner for inference and has no data: set "
                          "learn.dls = DataLoaders(train, valid) to fit or evaluate it, or pass dl= to evaluate / "
                          "get_preds")

    def __len__(self) -> int:
        raise self._missing()

    def __bool__(self) -> bool:
        return False

    def __iter__(self) -> Any:
        raise self._missing()


def _no_loss(*args: Any) -> Any:
    raise ValueError("this learner was loaded without its loss function (it could not be pickled, or the file "
                     "was loaded safely): pass loss_fn= to load_learner")


def load_learner(path: str | os.PathLike, model: nn.Module | None = None, trusted: bool = False,
                 learner_class: type | None = None, loss_fn: Any = None, map_location: Any = "cpu") -> Any:
    """A learner for inference from a file `Learner.export` wrote, without data (`NoData`).

    Args:
        path: the exported file.
        model: a model of the exported architecture; the weights are loaded into it, and nothing
            in the file is unpickled (safe).
        trusted: without `model`, unpickle the file's model, learner class and loss function:
            that can run code the file names, so only for files from a source you trust.
        learner_class: the learner class to make (default: the exported one when `trusted`,
            else `nntrain.Learner`); give your subclass to keep its `call_model` / `infer`.
        loss_fn: the loss function (default: the exported one when `trusted` and it was
            picklable; else one that says it is missing).
        map_location: where the weights go (`torch.load`'s; default the CPU).

    Raises:
        CheckpointError: the file is missing, unreadable, or no export.
        ValueError: neither `model` nor `trusted=True` (naming both), or `model`'s weights do
            not fit the file's.
    """
    from nntrain.checkpoint import CheckpointError
    from nntrain.learner import Learner

    state = read_checkpoint(path, map_location)
    if state.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a file Learner.export wrote (format {state.get('format')!r}): load "
                              f"weights files with learn.load, checkpoints with fit(resume=...)")
    exported = {}
    if model is not None:
        try:
            model.load_state_dict(state["state_dict"])
        except RuntimeError as exc:
            raise ValueError(f"the model given does not fit the weights in {path} (exported from "
                             f"{state['model_class']}): {exc}") from exc
    elif trusted:
        try:
            exported = _Unpickler(io.BytesIO(state["pickled"]), state["tensors"]).load()
        except (AttributeError, ImportError) as exc:  # a class defined in a script's __main__, or renamed
            raise ValueError(f"{path} names a class that cannot be found here ({exc}): import or define the "
                             f"model's class ({state['model_class']}) and the learner's ({state['learner_class']}) "
                             f"before loading, or pass model=") from exc
        model = exported["model"]
    else:
        name = state["model_class"].rsplit(".", 1)[-1]
        raise ValueError(f"{path} holds a {state['model_class']} as a pickle, and unpickling can run code the file "
                         f"names, so load_learner does not do it by default: pass model={name}(...) (the same "
                         f"architecture: only the weights are read, safely), or trusted=True if you trust the "
                         f"file's source")
    cls = learner_class or exported.get("learner_class") or Learner
    loss = loss_fn or exported.get("loss_fn") or _no_loss
    return cls(model, NoData(), loss)
