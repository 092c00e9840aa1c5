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
    raise TypeError(
        f"loss_fn must return a 0-dim tensor (one number that backward can differentiate), it returned {what}{hint}"
    )


def _devices(x: Any) -> set[torch.device]:
    """The devices of the tensors in `x` (a tensor, or a tuple, list or mapping of them)."""
    if isinstance(x, torch.Tensor):
        return {x.device}
    items = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    return {t.device for t in items if isinstance(t, torch.Tensor)}


def _note_model_failure(exc: BaseException, inputs: Any, training: bool, model: Any = None) -> None:
    """Attach the input's shape, dtype and device (and, for a BatchNorm batch of one, the fix;
    for inputs on another device than the model, the fix) to a failure of the forward pass."""
    if not hasattr(exc, "add_note"):
        return
    if isinstance(inputs, torch.Tensor):
        desc = f"shape {tuple(inputs.shape)}, dtype {inputs.dtype}, device {inputs.device}"
    elif isinstance(inputs, Mapping):  # the model's keyword arguments: each one's shape
        desc = "{" + ", ".join(f"{k!r}: {_describe(v).removeprefix('a tensor of ')}" for k, v in inputs.items()) + "}"
    else:
        desc = _describe(inputs)
    exc.add_note(f"model(inputs) failed: inputs {desc}")
    model_devices = {p.device for p in model.parameters()} if isinstance(model, torch.nn.Module) else set()
    input_devices = _devices(inputs)
    if model_devices and input_devices and model_devices != input_devices:
        names = lambda ds: ", ".join(sorted(map(str, ds)))  # noqa: E731
        exc.add_note(
            f"the model is on {names(model_devices)} and the inputs on {names(input_devices)}: let the "
            f"learner place both (Learner(..., device='auto'), the default) or attach DeviceS(device)"
        )
    if (
        training
        and isinstance(inputs, torch.Tensor)
        and inputs.ndim
        and inputs.shape[0] == 1
        and "more than 1 value per channel" in str(exc)
    ):
        exc.add_note(
            "the training batch has 1 sample (the epoch's last, smaller batch?): BatchNorm cannot train "
            "on it; drop it with drop_last=True on the training loader"
        )


def _note_shapes(exc: BaseException, preds: Any, targets: Any) -> None:
    """Attach the shapes of predictions and targets to a failure of the loss function."""
    shape = lambda t: tuple(t.shape) if hasattr(t, "shape") else type(t).__name__  # noqa: E731
    if hasattr(exc, "add_note"):
        exc.add_note(f"loss_fn(preds, targets) failed: preds shape {shape(preds)}, targets shape {shape(targets)}")
        devices = _devices(preds) | _devices(targets)
        if len(devices) > 1:
            exc.add_note(
                f"preds are on {', '.join(map(str, _devices(preds)))} and targets on "
                f"{', '.join(map(str, _devices(targets)))}: put both on one device (DeviceS moves "
                f"whole batches)"
            )


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
    raise TypeError(
        f"a batch must be a pair (inputs, targets) (a tuple or list of at least 2) or a mapping "
        f"with the targets under 'labels'; got {_describe(batch)}"
    )


def check_batch_structure(exc: Exception | None, batch: Any, mode: str) -> None:
    """Raise a TypeError naming the expected `(inputs, targets)` when a batch is not one
    (`mode`: the pass, "train", "valid" or "test"; `exc`: the failure it caused, if any)."""
    if (
        batch is None
        or (isinstance(batch, (tuple, list)) and len(batch) >= 2)
        or (isinstance(batch, Mapping) and any(k in batch for k in TARGET_KEYS))
    ):
        return
    mode = {"train": "training", "valid": "validation"}.get(mode, mode)
    mapping = (
        f" (a mapping needs its targets under {' or '.join(repr(k) for k in TARGET_KEYS)}; its keys: "
        f"{sorted(map(str, batch))})"
        if isinstance(batch, Mapping)
        else ""
    )
    raise TypeError(
        f"a batch must be a pair (inputs, targets) (a tuple or list of at least 2) or a mapping with "
        f"'labels'; the {mode} loader yielded {_describe(batch)}{mapping}"
    ) from exc


def check_fit_args(lr: Any, resume: Any) -> None:
    """Raise for a `fit` argument of the wrong kind, before anything runs.

    Raises:
        ValueError: `lr` not a finite number >= 0 or a `slice(lo, hi)` (`check_lr_range`).
        TypeError: `resume` not a path, a directory or "last" (`True`, "").
    """
    if lr is not None:
        check_lr_range(lr)
    if resume is not None and (
        isinstance(resume, bool) or not isinstance(resume, (str, os.PathLike)) or str(resume) == ""
    ):
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
    warnings.warn(
        "the validation loader is empty (len(dls.valid) == 0): the fit runs no validation pass",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def loader_length(dl: Any) -> int | None:
    """The number of batches `dl` yields, or None when it cannot say (a `DataLoader` over an
    `IterableDataset` without `__len__`, a generator)."""
    try:
        return len(dl)
    except TypeError:
        return None


def check_loaders(dls: Any, model: Any = None, mapping_targets: bool = True) -> None:
    """Raise before a fit for a missing, empty or not iterable training loader, a loader that
    would be used up after one pass (an iterator or generator), (for a `model` with BatchNorm) a
    training loader whose last batch holds one sample, or (with `mapping_targets`: the learner
    splits batches the default way) a loader whose first item is a mapping without targets."""
    for name, dl in (("train", dls.train), ("valid", dls.valid)):
        if (dl is None and name == "train") or (dl is not None and not hasattr(dl, "__iter__")):
            raise TypeError(
                f"dls.{name} is {'None' if dl is None else 'a ' + type(dl).__name__}, not a loader: "
                f"give a DataLoader (or anything iterable again each epoch) of (inputs, targets)"
            )
    if loader_length(dls.train) == 0:
        raise ValueError(
            "the training loader is empty (len(dls.train) == 0): check the dataset and that "
            "batch_size is not larger than the dataset with drop_last=True"
        )
    for name, dl in (("train", dls.train), ("valid", dls.valid)):
        if isinstance(dl, Iterator):  # a generator or iterator: used up after one pass
            raise TypeError(
                f"dls.{name} is an iterator ({type(dl).__name__}): it would be used up after one "
                f"pass and the next epochs would train on nothing; give a DataLoader or another "
                f"object that can be iterated again"
            )
    if mapping_targets:
        for mode, dl in (("train", dls.train), ("valid", dls.valid)):
            _check_first_item(dl, mode)
    if model is not None:
        _check_single_sample_tail(model, dls.train)


def _check_first_item(dl: Any, mode: str) -> None:
    """Refuse up front a set of mappings without targets (found at its first item): for the
    validation set, rather than after a whole training pass."""
    dataset = getattr(dl, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return
    try:
        if len(dataset) == 0:
            return
        item = dataset[0]
    except Exception:  # not indexable by position: the loop finds out
        return
    if isinstance(item, Mapping):
        check_batch_structure(None, item, mode)


def _check_single_sample_tail(model: Any, dl: Any) -> None:
    """A BatchNorm model cannot train on a batch of one: find the loader's last batch of one up front
    (a plain `DataLoader` over a sized dataset with the default sampler), not at the epoch's end."""
    from torch.utils.data import RandomSampler, SequentialSampler

    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    bs, dataset = getattr(dl, "batch_size", None), getattr(dl, "dataset", None)
    if (
        not isinstance(bs, int)
        or getattr(dl, "drop_last", True)
        or not isinstance(getattr(dl, "sampler", None), (RandomSampler, SequentialSampler))
        or not hasattr(dataset, "__len__")
    ):
        return
    n = len(dataset)  # type: ignore[arg-type]  # has __len__: checked above
    if n > 1 and n % bs == 1:
        raise ValueError(
            f"the training loader's last batch holds 1 sample ({n} samples, batch_size {bs}) and the "
            f"model has BatchNorm, which cannot train on one sample: set drop_last=True on the "
            f"training loader, or another batch_size"
        )
