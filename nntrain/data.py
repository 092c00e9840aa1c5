"""Data: `DataLoaders` built from a Hugging Face `DatasetDict` of images, and the embedded digits set.

`DataLoaders.from_hf_dd` decodes the image column once into one float32 tensor and serves
batches by tensor indexing (`TensorPairDataset`), so a batch costs one index operation instead
of one PIL conversion per sample. `hf_ds_collate_fn` is the per-sample path, kept as the
reference (both paths give equal tensors) and for datasets that need per-item transforms.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nntrain.logs import quiet_loggers
from nntrain.rng import rng_state, set_rng_state

if TYPE_CHECKING:  # datasets and PIL are imported where they are used: `import nntrain` stays fast
    import datasets
    from PIL import Image

__all__ = [
    "DataLoaders",
    "ResumableDataLoader",
    "TensorPairDataset",
    "TensorDictDataset",
    "pre_batched_collate",
    "hf_ds_collate_fn",
    "digits_dataset_dict",
    "load_dataset_dict",
]

VALID_SPLIT_NAMES: tuple[str, ...] = ("valid", "validation", "test")
"""Split names tried, in order, for the validation loader when `valid_split` is not given."""

LABEL_COLUMN_NAMES: tuple[str, ...] = ("label", "labels")
"""Column names taken as the label column when no single column is a `ClassLabel`."""


def _import_datasets() -> Any:
    """`import datasets`, without tqdm's "IProgress not found" warning in a notebook lacking
    ipywidgets (datasets imports tqdm.auto; nntrain's own bars need no widgets)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import datasets
    return datasets


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


TOKEN_COLUMN_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
"""Columns of tokenized text `from_hf_dd` batches as a mapping when the dataset has no image column."""


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


def _token_tensors(ds: Any, cols: Sequence[str], y_col: str, split: str) -> TensorDictDataset:
    """The token columns of split `ds` as int64 tensors (rows must be padded to one length)."""
    table = ds.with_format("arrow")[:]
    inputs = {}
    for col in cols:
        rows = table.column(col).to_pylist()
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise ValueError(f"column {col!r} of split {split!r} has rows of different lengths "
                             f"{sorted(lengths)[:4]}: tokenize with padding='max_length' (and truncation) first")
        inputs[col] = torch.tensor(rows, dtype=torch.long)
    labels = torch.from_numpy(table.column(y_col).to_numpy().astype(np.int64))
    return TensorDictDataset(inputs, labels)


def _label_column(features: Any, y_col: str | None) -> str:
    """The label column: `y_col`, else the one ClassLabel column, else "label"/"labels"."""
    datasets = _import_datasets()

    if y_col is not None:
        return y_col
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if len(labels) != 1:
        labels = [c for c in LABEL_COLUMN_NAMES if c in features]
    if not labels:
        raise ValueError(f"cannot tell the label column (columns: {', '.join(map(repr, features))}); pass y_col=<name>")
    return labels[0]


class ResumableDataLoader(DataLoader):
    """A `DataLoader` that can continue an epoch where a checkpoint left it.

    It follows the `state_dict()` / `load_state_dict()` protocol Lightning uses for resumable
    loaders, so a Lightning checkpoint taken inside an epoch carries its position. The state is
    the RNG state the epoch's randomness (shuffle order, worker seeds) was drawn from and the
    number of batches served; after `load_state_dict`, the next iteration redraws that same
    order and skips (fetches and drops) the batches already served.

    The epoch's randomness is drawn at the first batch, not at `iter()`: with nothing in
    between, that is the same draw as a plain `DataLoader`'s. Construct it like a `DataLoader`;
    `DataLoaders.from_hf_dd` makes its training loader one.
    """

    _epoch_rng: dict[str, Any] | None = None  # RNG state the current epoch's order was drawn from
    _served: int = 0  # batches of the current epoch handed out
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
        self._epoch_rng, self._served = rng_state(), 0
        batches = super().__iter__()
        for _ in range(skip):
            next(batches)
        self._served = skip
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch is: its RNG state and the batches served (`served` 0 between
        epochs, when the next iteration starts a fresh epoch)."""
        done = self._epoch_rng is None or (hasattr(self, "__len__") and self._served >= len(self))
        return {"epoch_rng": None if done else self._epoch_rng, "served": 0 if done else self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration continue the epoch described by `state` (from `state_dict`)."""
        if set(state) != {"epoch_rng", "served"}:
            raise ValueError(f"not a ResumableDataLoader state: keys {sorted(state)}")
        self._pending = state if state["served"] > 0 else None


def pre_batched_collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `batch` unchanged: `TensorPairDataset.__getitems__` already built it."""
    return batch


def _image_array(img: Image.Image) -> np.ndarray:
    """`img` as a uint8 array of shape (H, W, C)."""
    arr = np.array(img)  # a writable copy: torch warns on read-only arrays
    if arr.dtype != np.uint8:
        raise ValueError(
            f"image mode {img.mode!r} decodes to {arr.dtype}, not uint8; convert the images to 'L' or "
            f"'RGB' first (e.g. dd.cast_column(col, datasets.Image(mode='L')))"
        )
    return arr[:, :, None] if arr.ndim == 2 else arr


def _image_to_tensor(img: Image.Image, flatten: bool) -> torch.Tensor:
    """One image as float32 in [0, 1], shape (C, H, W), or (C*H*W,) when `flatten`."""
    t = torch.from_numpy(_image_array(img)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return t.reshape(-1) if flatten else t


def hf_ds_collate_fn(batch: Sequence[Mapping[str, Any]], flatten: bool = True) -> tuple[torch.Tensor, ...]:
    """Collate dataset rows one value at a time: PIL images to float tensors, other values via `torch.tensor`.

    The slow per-item path; `DataLoaders.from_hf_dd(collate="per_item")` uses it.

    Args:
        batch: rows (dicts) of a Hugging Face dataset, images decoded to PIL.
        flatten: images become (C*H*W,) vectors instead of (C, H, W).

    Returns:
        One stacked tensor per column, in the rows' column order.
    """
    from PIL import Image

    def to_tensor(value: Any) -> torch.Tensor:
        return _image_to_tensor(value, flatten) if isinstance(value, Image.Image) else torch.tensor(value)

    columns = zip(*(row.values() for row in batch))
    out = []
    for i, col in enumerate(columns):
        values = [to_tensor(v) for v in col]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"the batch's column {i} holds items of different shapes {sorted(shapes)[:4]}: make the "
                             f"images one mode and size (convert, resize) before batching")
        out.append(torch.stack(values))
    return tuple(out)


def _decode_image_column(ds: datasets.Dataset, col: str) -> np.ndarray:
    """Decode image column `col` of `ds` into one uint8 array of shape (N, H, W, C)."""
    from PIL import Image

    mode = ds.features[col].mode
    # Reading the Arrow table skips datasets' per-row formatting; `[:]` applies any index mapping.
    cells = ds.with_format("arrow")[:].column(col).to_pylist()
    arrays, modes = [], set()
    for cell in cells:
        img = Image.open(io.BytesIO(cell["bytes"])) if cell["bytes"] is not None else Image.open(cell["path"])
        if mode is not None and img.mode != mode:
            img = img.convert(mode)
        modes.add(img.mode)
        arrays.append(_image_array(img))
    _check_same_images(col, modes, {a.shape[:2] for a in arrays})
    return np.stack(arrays)


def _check_same_images(col: str, modes: set[str], sizes: set[tuple[int, ...]]) -> None:
    """Raise a ValueError, with the fix, when the images of a column differ in mode or size."""
    if len(modes) > 1:
        raise ValueError(
            f"images in column '{col}' have different modes {sorted(modes)}; convert them to one mode first "
            f"(dd.cast_column({col!r}, datasets.Image(mode='RGB')), or 'L' for grayscale)")
    if len(sizes) > 1:
        raise ValueError(
            f"images in column '{col}' have different sizes (height, width) {sorted(sizes)[:4]}; resize them "
            f"to one size first (e.g. with dd.map and PIL's Image.resize)")


def _to_tensors(ds: datasets.Dataset, x_col: str, y_col: str, flatten: bool) -> TensorPairDataset:
    """The whole split as a `TensorPairDataset`: images float32 in [0, 1], labels int64."""
    images = torch.from_numpy(_decode_image_column(ds, x_col)).permute(0, 3, 1, 2).contiguous()
    x = images.to(torch.float32).div_(255)
    if flatten:
        x = x.reshape(len(x), -1)
    labels = ds.with_format("arrow")[:].column(y_col).to_numpy().astype(np.int64)  # astype copies: writable
    return TensorPairDataset(x, torch.from_numpy(labels))


def _find_splits(dd: datasets.DatasetDict, valid_split: str | None) -> tuple[str, str]:
    """The names of the train and valid splits of `dd`."""
    available = ", ".join(repr(s) for s in dd) or "none"
    if "train" not in dd:
        raise ValueError(f"the DatasetDict has no 'train' split (available: {available}); rename one to 'train'")
    if valid_split is not None:
        if valid_split not in dd:
            raise ValueError(f"valid_split {valid_split!r} is not a split of the DatasetDict (available: {available})")
        return "train", valid_split
    for name in VALID_SPLIT_NAMES:
        if name in dd:
            return "train", name
    raise ValueError(
        f"the DatasetDict has no validation split named {' / '.join(VALID_SPLIT_NAMES)} (available: "
        f"{available}); pass valid_split=<name>"
    )


def _find_columns(features: datasets.Features, x_col: str | None, y_col: str | None) -> tuple[str, str]:
    """The image and label column names: the given ones, checked, or detected from `features`."""
    datasets = _import_datasets()

    columns = ", ".join(repr(c) for c in features)
    if x_col is None:
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        if len(images) != 1:
            found = "no column" if not images else f"several columns ({', '.join(images)})"
            raise ValueError(f"{found} with a datasets.Image feature (columns: {columns}); pass x_col=<name>")
        x_col = images[0]
    if y_col is None:
        labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if len(labels) != 1:
            labels = [c for c in LABEL_COLUMN_NAMES if c in features]
        if not labels:
            raise ValueError(
                f"cannot tell the label column: not exactly one ClassLabel column and none named "
                f"'label'/'labels' (columns: {columns}); pass y_col=<name>"
            )
        y_col = labels[0]
    for role, col in (("x_col", x_col), ("y_col", y_col)):
        if col not in features:
            raise ValueError(f"{role}={col!r} is not a column of the dataset (columns: {columns})")
    if not isinstance(features[x_col], datasets.Image):
        raise ValueError(f"x_col={x_col!r} holds {type(features[x_col]).__name__}, not datasets.Image")
    return x_col, y_col


def _check_same_shape(train: tuple[int, ...], valid: tuple[int, ...], train_name: str, valid_name: str) -> None:
    """Raise a ValueError when the train and valid images differ in shape (the model fits one)."""
    if train != valid:
        raise ValueError(f"the images of split {train_name!r} have shape {train} but those of {valid_name!r} have "
                         f"{valid}: make both splits one mode and size (convert, resize)")


class DataLoaders:
    """A training loader and a validation loader, as `.train` and `.valid`."""

    def __init__(self, train: DataLoader, valid: DataLoader) -> None:
        self.train = train
        self.valid = valid

    def __repr__(self) -> str:
        return f"DataLoaders(train={len(self.train.dataset)} samples, valid={len(self.valid.dataset)} samples)"

    @classmethod
    def _from_token_columns(cls, dd: Any, batch_size: int, cols: list[str], y_col: str, train_name: str,
                            valid_name: str, **loader: Any) -> DataLoaders:
        for name in (train_name, valid_name):
            missing = [c for c in [*cols, y_col] if c not in dd[name].features]
            if missing:
                raise ValueError(f"split {name!r} lacks the columns {missing}")
            if len(dd[name]) == 0:
                raise ValueError(f"split {name!r} of the DatasetDict is empty: it needs at least one row")
        train_ds, valid_ds = (_token_tensors(dd[name], cols, y_col, name) for name in (train_name, valid_name))
        train = ResumableDataLoader(train_ds, batch_size=batch_size, collate_fn=pre_batched_collate, **loader)
        valid = DataLoader(valid_ds, batch_size=batch_size, shuffle=False, num_workers=loader["num_workers"],
                           collate_fn=pre_batched_collate)
        return cls(train, valid)

    @classmethod
    def from_hf_dd(
        cls,
        dd: datasets.DatasetDict,
        batch_size: int,
        *,
        x_col: str | Sequence[str] | None = None,
        y_col: str | None = None,
        flatten: bool = True,
        shuffle: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
        valid_split: str | None = None,
        generator: torch.Generator | None = None,
        collate: Literal["batched", "per_item"] = "batched",
    ) -> DataLoaders:
        """Loaders over the image and label columns of `dd`'s train and valid splits, or over
        tokenized text: with no image column and token columns (`input_ids`, `attention_mask`,
        `token_type_ids`; or `x_col` a list of column names), padded to one length, each batch
        is a mapping `{"input_ids": ..., "attention_mask": ..., "labels": ...}` (a
        `TensorDictDataset`; the learner calls `model(input_ids=..., attention_mask=...)`).

        Args:
            dd: a `DatasetDict` with a "train" split and a "valid"/"validation"/"test" split.
            batch_size: samples per batch (both loaders).
            x_col: the image column; default: the one column with a `datasets.Image` feature (a
                list of names: token columns).
            y_col: the label column; default: the one `ClassLabel` column, else "label"/"labels".
            flatten: images become (C*H*W,) vectors instead of (C, H, W).
            shuffle: shuffle the train loader each epoch (`RandomSampler`: `torch.manual_seed`
                or `generator` sets the order); the valid loader never shuffles.
            num_workers: worker processes per loader.
            drop_last: drop the last incomplete train batch (the valid loader keeps it).
            valid_split: the split for the valid loader, instead of detecting it.
            generator: random generator for the train sampler.
            collate: "batched" decodes each split once into tensors and indexes whole batches;
                "per_item" collates decoded rows with `hf_ds_collate_fn` (slow; the reference).

        Raises:
            ValueError: bad `batch_size` or `collate`, a split or a column missing.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if collate not in ("batched", "per_item"):
            raise ValueError(f"collate must be 'batched' or 'per_item', got {collate!r}")
        train_name, valid_name = _find_splits(dd, valid_split)
        features = dd[train_name].features
        token_cols = list(x_col) if isinstance(x_col, (list, tuple)) else (
            [c for c in TOKEN_COLUMN_NAMES if c in features]
            if x_col is None and not any(type(f).__name__ == "Image" for f in features.values()) else [])
        if token_cols:
            return cls._from_token_columns(dd, batch_size, token_cols, _label_column(features, y_col), train_name,
                                           valid_name, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
                                           generator=generator)
        x_col, y_col = _find_columns(features, x_col, y_col)
        for col in (x_col, y_col):
            if col not in dd[valid_name].features:
                raise ValueError(f"column {col!r} is in the train split but not in split {valid_name!r}")
        for name in (train_name, valid_name):
            if len(dd[name]) == 0:
                raise ValueError(f"split {name!r} of the DatasetDict is empty: it needs at least one row")
        if collate == "batched":
            train_ds = _to_tensors(dd[train_name], x_col, y_col, flatten)
            valid_ds = _to_tensors(dd[valid_name], x_col, y_col, flatten)
            _check_same_shape(tuple(train_ds.x.shape[1:]), tuple(valid_ds.x.shape[1:]), train_name, valid_name)
            collate_fn = pre_batched_collate
        else:
            # select_columns also orders the columns, so each row yields (image, label).
            train_ds = dd[train_name].select_columns([x_col, y_col])
            valid_ds = dd[valid_name].select_columns([x_col, y_col])
            first = [_image_array(ds[0][x_col]).shape for ds in (train_ds, valid_ds)]
            _check_same_shape(first[0], first[1], train_name, valid_name)
            collate_fn = partial(hf_ds_collate_fn, flatten=flatten)
        train = ResumableDataLoader(train_ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                           drop_last=drop_last, collate_fn=collate_fn, generator=generator)
        valid = DataLoader(valid_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                           collate_fn=collate_fn)
        return cls(train, valid)


def digits_dataset_dict(valid_fraction: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """scikit-learn's 1797 8x8 handwritten digits as a `DatasetDict` of grayscale PIL images.

    Each class is split on its own (a permutation drawn from `seed`), so both splits hold
    every digit in about the same proportion.

    Args:
        valid_fraction: share of each class that goes to the "validation" split.
        seed: seed of the split's permutation.

    Returns:
        Splits "train" and "validation" with features image (`datasets.Image`, mode "L",
        values 0..255) and label (`ClassLabel` "0".."9").
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be between 0 and 1 (exclusive), got {valid_fraction!r}")
    datasets = _import_datasets()
    from PIL import Image
    from sklearn.datasets import load_digits  # 1 s import, needed only here

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    valid_idx = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        valid_idx.append(members[: round(valid_fraction * len(members))])
    is_valid = np.zeros(len(labels), dtype=bool)
    is_valid[np.concatenate(valid_idx)] = True
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )

    def split(mask: np.ndarray) -> datasets.Dataset:
        images = [Image.fromarray(p) for p in pixels[mask]]  # 2-D uint8 arrays make "L" images
        return datasets.Dataset.from_dict({"image": images, "label": labels[mask].tolist()}, features=features)

    return datasets.DatasetDict({"train": split(~is_valid), "validation": split(is_valid)})


def _hub_unreachable(timeout: float = 1.5) -> str | None:
    """Why the hub cannot be reached now, or None when it can: a TCP connection to its endpoint
    (`HF_ENDPOINT`), or to the HTTPS proxy in the way, does not open within `timeout` seconds.

    The connection is tried in a daemon thread, because a name lookup does not honour socket
    timeouts (an unreachable DNS server can hold it for tens of seconds).
    """
    import os
    import socket
    import threading
    import urllib.parse
    import urllib.request

    hub = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxies = urllib.request.getproxies()
    proxy = proxies.get(hub.scheme) or proxies.get("all")
    via = hub
    if proxy and not urllib.request.proxy_bypass(hub.hostname or ""):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (via.hostname or "", via.port or (443 if via.scheme == "https" else 80))
    outcome: list[OSError | None] = []  # the thread's answer: None connected, else the error

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    probe = threading.Thread(target=connect, name="nntrain-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    if outcome == [None]:
        return None
    why = f"no answer within {timeout:g} s" if not outcome or isinstance(outcome[0], TimeoutError) else outcome[0]
    return (f"cannot connect to {'the hub' if via is hub else 'the proxy'} {address[0]}:{address[1]} "
            f"({why}; HF_HUB_OFFLINE=1 loads a cached copy)")


def load_dataset_dict(name: str) -> datasets.DatasetDict:
    """The `DatasetDict` called `name`: "digits" is the embedded set, any other name comes from the hub.

    Unless `HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` is set (the hub's cache is used) or `name` is a
    local path, the hub is probed first, so an offline machine fails in about a second instead of
    after the hub client's retries.

    Raises:
        RuntimeError: the hub could not be reached or has no such dataset.
    """
    if name == "digits":
        return digits_dataset_dict()
    import logging
    import os

    def failed(reason: str) -> RuntimeError:
        return RuntimeError(
            f"could not load dataset {name!r} from the hub: {reason}; use --dataset digits for the embedded data")

    offline = any(os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}
                  for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    reason = None if offline or os.path.exists(name) else _hub_unreachable()
    if reason is not None:
        raise failed(reason)
    datasets = _import_datasets()

    # For this call only: the hub client's retry and fallback warnings would bury the one-line error.
    try:
        with quiet_loggers(("datasets", "huggingface_hub"), logging.ERROR):
            return datasets.load_dataset(name)
    except OSError as exc:  # ConnectionError, DatasetNotFoundError (a FileNotFoundError), timeouts
        raise failed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
