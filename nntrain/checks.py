"""Input checks and failure notes, shared by both engines: the batch structure (`split_batch`,
`check_batch_structure`), `fit` arguments, the loss, a loader's length, and the notes added to a
failing forward pass or loss. Each check runs before work is done or only on failure, so the
per-batch path pays a type check at most."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from nntrain.optim import check_lr_range

__all__ = [
    "TARGET_KEYS",
    "split_batch",
    "check_batch_structure",
    "check_lr",
    "check_fit_args",
    "announce_resume",
    "loader_length",
    "check_loaders",
]


def check_lr(lr: Any, where: str = "lr") -> None:
    """Raise a ValueError unless `lr` is a finite number >= 0."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where} must be a finite number >= 0, got {lr!r}")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}"
    return f"a {type(x).__name__}"


def _check_loss(loss: Any) -> None:
    """Raise a TypeError unless `loss` is a 0-dim tensor (the step backpropagates it)."""
    if isinstance(loss, torch.Tensor) and loss.ndim == 0:
        return
    what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
    hint = " (reduce it: reduction='mean')" if isinstance(loss, torch.Tensor) else " (compute it with torch ops)"
    raise TypeError(f"loss_fn must return a 0-dim tensor (one number that backward can differentiate), "
                    f"it returned {what}{hint}")


def _note_model_failure(exc: BaseException, inputs: Any, training: bool) -> None:
    """Attach the input's shape and dtype (and, for a BatchNorm batch of one, the fix) to a
    failure of the model's forward pass."""
    if not hasattr(exc, "add_note"):
        return
    desc = f"shape {tuple(inputs.shape)}, dtype {inputs.dtype}" if isinstance(inputs, torch.Tensor) else \
        _describe(inputs)
    exc.add_note(f"model(inputs) failed: inputs {desc}")
    if training and isinstance(inputs, torch.Tensor) and inputs.ndim and inputs.shape[0] == 1 and \
            "more than 1 value per channel" in str(exc):
        exc.add_note("the training batch has 1 sample (the epoch's last, smaller batch?): BatchNorm cannot train "
                     "on it; drop it with drop_last=True on the training loader")


def _note_shapes(exc: BaseException, preds: Any, targets: Any) -> None:
    """Attach the shapes of predictions and targets to a failure of the loss function."""
    shape = lambda t: tuple(t.shape) if hasattr(t, "shape") else type(t).__name__  # noqa: E731
    if hasattr(exc, "add_note"):
        exc.add_note(f"loss_fn(preds, targets) failed: preds shape {shape(preds)}, targets shape {shape(targets)}")


TARGET_KEYS: tuple[str, ...] = ("labels", "label")
"""Keys of a mapping batch that hold the targets (Hugging Face's convention), tried in order."""


def split_batch(batch: Any) -> tuple[Any, Any]:
    """`(inputs, targets)` of a batch: a tuple's or list's first two items (targets None for a
    1-tuple); for a mapping, the targets under `"labels"` (or `"label"`) and the other entries
    as the inputs (the model's keyword arguments), targets None without such a key.

    Raises:
        TypeError: the batch is neither (a bare tensor would make `batch[0]` its first sample).
    """
    if type(batch) is tuple or isinstance(batch, (tuple, list)):
        if len(batch) >= 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    elif isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k != key}, (None if key is None else batch[key])
    raise TypeError(f"a batch must be a pair (inputs, targets) (a tuple or list of at least 2) or a mapping "
                    f"with the targets under 'labels'; got {_describe(batch)}")


def check_batch_structure(exc: Exception | None, batch: Any, mode: str) -> None:
    """Raise a TypeError naming the expected `(inputs, targets)` when a batch is not one
    (`mode`: the pass, "train", "valid" or "test"; `exc`: the failure it caused, if any)."""
    if batch is None or (isinstance(batch, (tuple, list)) and len(batch) >= 2) or \
            (isinstance(batch, Mapping) and any(k in batch for k in TARGET_KEYS)):
        return
    mode = {"train": "training", "valid": "validation"}.get(mode, mode)
    mapping = f" (a mapping needs its targets under {' or '.join(repr(k) for k in TARGET_KEYS)}; its keys: " \
              f"{sorted(map(str, batch))})" if isinstance(batch, Mapping) else ""
    raise TypeError(f"a batch must be a pair (inputs, targets) (a tuple or list of at least 2) or a mapping with "
                    f"'labels'; the {mode} loader yielded {_describe(batch)}{mapping}") from exc


def check_fit_args(lr: Any, resume: Any) -> None:
    """Raise for a `fit` argument of the wrong kind, before anything runs.

    Raises:
        ValueError: `lr` not a finite number >= 0 or a `slice(lo, hi)` (`check_lr_range`).
        TypeError: `resume` not a path, a directory or "last" (`True`, "").
    """
    if lr is not None:
        check_lr_range(lr)
    if resume is not None and (isinstance(resume, bool) or not isinstance(resume, (str, os.PathLike))
                               or str(resume) == ""):
        raise TypeError(f'resume must be a checkpoint file, a directory or "last", got {resume!r}')


def announce_resume(plan: Any, rank: int) -> None:
    """Say on stderr (rank 0) where a fit continues from."""
    if plan is not None and rank == 0:
        print(f"nntrain: resuming from {plan.describe()}", file=sys.stderr)


def _empty_valid(dl: Any) -> bool:
    """Whether the validation loader is known to be empty (then warn: no validation pass, as
    Lightning skips an empty loader)."""
    if loader_length(dl) != 0:
        return False
    warnings.warn("the validation loader is empty (len(dls.valid) == 0): the fit runs no validation pass",
                  RuntimeWarning, stacklevel=3)
    return True


def loader_length(dl: Any) -> int | None:
    """The number of batches `dl` yields, or None when it cannot say (a `DataLoader` over an
    `IterableDataset` without `__len__`, a generator)."""
    try:
        return len(dl)
    except TypeError:
        return None


def check_loaders(dls: Any) -> None:
    """Raise before a fit for a training loader that is empty, or a loader that would be used up
    after one pass (an iterator or generator)."""
    if loader_length(dls.train) == 0:
        raise ValueError("the training loader is empty (len(dls.train) == 0): check the dataset and that "
                         "batch_size is not larger than the dataset with drop_last=True")
    for name, dl in (("train", dls.train), ("valid", dls.valid)):
        if isinstance(dl, Iterator):  # a generator or iterator: used up after one pass
            raise TypeError(f"dls.{name} is an iterator ({type(dl).__name__}): it would be used up after one "
                            f"pass and the next epochs would train on nothing; give a DataLoader or another "
                            f"object that can be iterated again")
