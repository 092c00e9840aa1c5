"""Loaders and datasets that serve whole batches: `TensorPairDataset`, `TensorDictDataset`,
`BatchLoader` (a `DataLoader` that finishes each batch in the main process, e.g. uint8 images
to floats on the device) and `ResumableDataLoader` (continues an epoch from a checkpoint)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from nntrain.rng import rng_state, set_rng_state

__all__ = [
    "TensorPairDataset",
    "TensorDictDataset",
    "pre_batched_collate",
    "BatchLoader",
    "ResumableDataLoader",
    "UInt8ToFloat",
]


class TensorPairDataset(Dataset):
    """Inputs `x` and targets `y` held as two tensors; `__getitems__` serves a whole batch at once."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} inputs and {len(y)} targets")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at `indices` as `(x[indices], y[indices])`: called by DataLoader's fetcher."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


class TensorDictDataset(Dataset):
    """Named input tensors (token ids, attention masks) and a target tensor; `__getitems__` serves
    a whole batch as a mapping `{name: tensor[indices], ..., "labels": y[indices]}` (the Hugging
    Face convention the learner splits into `model(**inputs)` and targets)."""

    def __init__(self, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        lengths = {name: len(t) for name, t in inputs.items()}
        if any(n != len(y) for n in lengths.values()):
            raise ValueError(f"every input must have one row per target ({len(y)}), got {lengths}")
        self.inputs = inputs
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{name: t[i] for name, t in self.inputs.items()}, "labels": self.y[i]}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch at `indices`, built by indexing each tensor once."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {**{name: t[idx] for name, t in self.inputs.items()}, "labels": self.y[idx]}


def pre_batched_collate(batch: Any) -> Any:
    """Return `batch` unchanged: the dataset's `__getitems__` already built it."""
    return batch


class UInt8ToFloat:
    """Finish an `(images, labels)` batch of uint8 images: move it to `device` (when given), then
    make the images float32 in [0, 1] there (`x / 255`), flattened to (N, C*H*W) when `flatten`.

    On a GPU the uint8 batch crosses the bus (a quarter of the float bytes) and the division runs
    on the device. `device="auto"` is CUDA's current device when there is one, else the CPU,
    resolved at the first batch (so each DDP rank finds its own).
    """

    def __init__(self, device: str | torch.device | None = None, flatten: bool = False) -> None:
        self.device = device
        self.flatten = flatten
        self._target: torch.device | None = None

    def target(self) -> torch.device | None:
        """The device batches go to (None: where they are)."""
        if self.device is None:
            return None
        if self._target is None:
            name = str(self.device)
            if name == "auto":
                name = "cuda" if torch.cuda.is_available() else "cpu"
            device = torch.device(name)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            self._target = device
        return self._target

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        device = self.target()
        if device is not None and x.device != device:
            non_blocking = device.type != "cpu"  # a copy to the host could be read before it lands
            x, y = x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
        x = x.to(torch.float32).div_(255)
        return (x.reshape(len(x), -1) if self.flatten else x), y

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_target": None}  # another process resolves its own device


class BatchLoader(DataLoader):
    """A `DataLoader` that applies `finish` to every batch in the main process (after the
    workers, which then pass the smaller uint8 batches), and calls the dataset's `start_epoch()`,
    when it has one, as each pass begins, before any worker starts (a stream draws its shuffle
    seed and its rank's shard there).

    Args:
        dataset: as for `DataLoader`.
        *args: as for `DataLoader`.
        finish: a function of the batch, or None.
        **kwargs: as for `DataLoader`.
    """

    def __init__(self, dataset: Any, *args: Any, finish: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.finish = finish

    def __iter__(self) -> Any:
        batches = self._unfinished()
        return batches if self.finish is None else map(self.finish, batches)

    def _unfinished(self) -> Any:
        """The pass's batches as the workers (or the dataset) made them."""
        start = getattr(self.dataset, "start_epoch", None)
        if callable(start):
            start()
        return super().__iter__()


class ResumableDataLoader(BatchLoader):
    """A `DataLoader` that can continue an epoch where a checkpoint left it.

    It follows the `state_dict()` / `load_state_dict()` protocol Lightning uses for resumable
    loaders, so a Lightning checkpoint taken inside an epoch carries its position. The state is
    the RNG state the epoch's randomness (shuffle order, worker seeds, a stream's shuffle seed)
    was drawn from and the number of batches served; after `load_state_dict`, the next
    iteration redraws that same order and skips (fetches and drops) the batches already served.
    A stream without a length is continued the same way, by reading it again up to the position.

    The epoch's randomness is drawn at the first batch, not at `iter()`: with nothing in
    between, that is the same draw as a plain `DataLoader`'s. Construct it like a `DataLoader`
    (plus `BatchLoader`'s `finish`); `DataLoaders.from_hf_dd` makes its training loader one.
    """

    _epoch_rng: dict[str, Any] | None = None  # RNG state the current epoch's order was drawn from
    _served: int = 0  # batches of the current epoch handed out
    _ended: bool = False  # the current epoch's batches are all served
    _pending: dict[str, Any] | None = None  # a loaded state the next iteration continues from
    resumed_at: int = 0
    """Batches the latest iteration skips because a loaded state had served them (0: a fresh epoch)."""

    def __iter__(self) -> Any:
        pending, self._pending = self._pending, None
        self.resumed_at = 0 if pending is None else pending["served"]
        return self._serve(None if pending is None else pending["epoch_rng"], self.resumed_at)

    def _serve(self, epoch_rng: dict[str, Any] | None, skip: int) -> Any:
        if epoch_rng is not None:
            set_rng_state(epoch_rng)
        self._epoch_rng, self._served, self._ended = rng_state(), 0, False
        finish = self.finish
        batches = self._unfinished()
        for _ in range(skip):  # skipped batches are not finished (no copy to the device)
            next(batches)
        self._served = skip
        for batch in batches:
            self._served += 1
            yield batch if finish is None else finish(batch)
        self._ended = True

    def _length(self) -> int | None:
        try:
            return len(self)
        except TypeError:  # an IterableDataset without a length
            return None

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch is: its RNG state and the batches served (`served` 0 between
        epochs, when the next iteration starts a fresh epoch)."""
        n = self._length()
        done = self._epoch_rng is None or self._ended or (n is not None and self._served >= n)
        return {"epoch_rng": None if done else self._epoch_rng, "served": 0 if done else self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration continue the epoch described by `state` (from `state_dict`)."""
        if set(state) != {"epoch_rng", "served"}:
            raise ValueError(f"not a ResumableDataLoader state: keys {sorted(state)}")
        self._pending = state if state["served"] > 0 else None
