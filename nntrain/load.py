"""`load_learner(path)`: a learner for inference from a file `Learner.export` wrote
(`nntrain.export` says what the file holds and why loading is safe by default)."""

from __future__ import annotations

import io
import os
from typing import Any

from torch import nn

from nntrain.checkpoint import CheckpointError, read_checkpoint
from nntrain.export import EXPORT_FORMAT, _Unpickler
from nntrain.learner import Learner

__all__ = ["NoData", "load_learner"]


class NoData:
    """The loaders of a learner made by `load_learner`: it has none, and says so when a fit or
    an evaluation asks for one. Set `learn.dls` to train or evaluate it again."""

    def __init__(self) -> None:
        self.train = self.valid = self

    def _missing(self) -> ValueError:
        return ValueError(
            "this learner was made by load_learner for inference and has no data: set "
            "learn.dls = DataLoaders(train, valid) to fit or evaluate it, or pass dl= to evaluate / "
            "get_preds"
        )

    def __len__(self) -> int:
        raise self._missing()

    def __bool__(self) -> bool:
        return False

    def __iter__(self) -> Any:
        raise self._missing()


def _no_loss(*args: Any) -> Any:
    raise ValueError(
        "this learner was loaded without its loss function (it could not be pickled, or the file "
        "was loaded safely): pass loss_fn= to load_learner"
    )


def load_learner(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    trusted: bool = False,
    learner_class: type | None = None,
    loss_fn: Any = None,
    map_location: Any = "cpu",
) -> Any:
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
    state = read_checkpoint(path, map_location)
    if state.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{path} is not a file Learner.export wrote (format {state.get('format')!r}): load "
            f"weights files with learn.load, checkpoints with fit(resume=...)"
        )
    exported = {}
    if model is not None:
        try:
            model.load_state_dict(state["state_dict"])
        except RuntimeError as exc:
            raise ValueError(
                f"the model given does not fit the weights in {path} (exported from {state['model_class']}): {exc}"
            ) from exc
    elif trusted:
        try:
            exported = _Unpickler(io.BytesIO(state["pickled"]), state["tensors"]).load()
        except (AttributeError, ImportError) as exc:  # a class defined in a script's __main__, or renamed
            raise ValueError(
                f"{path} names a class that cannot be found here ({exc}): import or define the "
                f"model's class ({state['model_class']}) and the learner's ({state['learner_class']}) "
                f"before loading, or pass model="
            ) from exc
        model = exported["model"]
    else:
        name = state["model_class"].rsplit(".", 1)[-1]
        raise ValueError(
            f"{path} holds a {state['model_class']} as a pickle, and unpickling can run code the file "
            f"names, so load_learner does not do it by default: pass model={name}(...) (the same "
            f"architecture: only the weights are read, safely), or trusted=True if you trust the "
            f"file's source"
        )
    cls = learner_class or exported.get("learner_class") or Learner
    loss = loss_fn or exported.get("loss_fn") or _no_loss
    return cls(model, NoData(), loss)
