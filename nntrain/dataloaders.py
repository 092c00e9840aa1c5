"""`DataLoaders`: a training and a validation loader, and `DataLoaders.from_hf_dd`, which makes
them from a Hugging Face `DatasetDict` of images or token columns, or an `IterableDatasetDict`
(a streaming split).

Images are decoded once into a uint8 array, cached on disk next to the dataset's cache
(`nntrain.image_cache`), served from memory or read from the cache file per batch, and made floats per batch by the
loader (`UInt8ToFloat`, on `device` when one is given). Every mode gives the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nntrain.hf_columns import check_same_shape, find_columns, find_splits, import_datasets, label_column, token_columns
from nntrain.image_cache import image_dataset
from nntrain.images import ImageSpec, Resize, as_size, hf_ds_collate_fn, prepare_image
from nntrain.loaders import BatchLoader, ResumableDataLoader, UInt8ToFloat, pre_batched_collate
from nntrain.streaming import ImageRows, StreamBatches, TokenRows
from nntrain.tokens import TokenPadding, token_dataset

if TYPE_CHECKING:
    import datasets

__all__ = ["DataLoaders"]


def _labels(ds: Any, y_col: str) -> torch.Tensor:
    """Column `y_col` of `ds` as int64 labels (read alone from the Arrow table)."""
    column = ds.with_format("arrow", columns=[y_col])[:].column(y_col)
    return torch.from_numpy(column.to_numpy().astype(np.int64))  # astype copies: writable


def _check_rows(dd: Any, names: Sequence[str], cols: Sequence[str]) -> None:
    """Raise when a split lacks one of `cols` or (map-style) has no row."""
    for name in names:
        features = dd[name].features
        missing = [c for c in cols if features is not None and c not in features]
        if missing:
            raise ValueError(
                f"column {missing[0]!r} is in the train split but not in split {name!r}"
                if name != names[0]
                else f"split {name!r} lacks the columns {missing}"
            )
        if hasattr(dd[name], "__len__") and len(dd[name]) == 0:
            raise ValueError(f"split {name!r} of the DatasetDict is empty: it needs at least one row")


@dataclass
class _LoaderOptions:
    """What both loaders of `from_hf_dd` are made with (shuffling and `drop_last`: training only)."""

    shuffle: bool
    num_workers: int
    drop_last: bool
    generator: torch.Generator | None
    pin_memory: bool


def _pin(device: str | torch.device | None) -> bool:
    """Pin host batches when they go to CUDA (the copy can then overlap)."""
    name = "" if device is None else str(device)
    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


class DataLoaders:
    """A training loader and a validation loader, as `.train` and `.valid`."""

    def __init__(self, train: DataLoader, valid: DataLoader) -> None:
        self.train = train
        self.valid = valid

    def __repr__(self) -> str:
        def size(dl: Any) -> str:
            try:
                return f"{len(dl.dataset)} samples"
            except TypeError:
                return "a stream"

        return f"DataLoaders(train={size(self.train)}, valid={size(self.valid)})"

    @classmethod
    def _loaders(
        cls,
        train_ds: Dataset,
        valid_ds: Dataset,
        batch_size: int | None,
        opts: _LoaderOptions,
        finish: Any = None,
        collate_fn: Any = pre_batched_collate,
    ) -> DataLoaders:
        """A `ResumableDataLoader` for training and a `BatchLoader` for validation (never shuffled,
        last batch kept), both finishing batches with `finish`; `batch_size` None: the datasets
        yield batches (streams), and shuffling is theirs."""
        sampling: dict[str, Any] = (
            {} if batch_size is None else dict(shuffle=opts.shuffle, drop_last=opts.drop_last, generator=opts.generator)
        )
        train = ResumableDataLoader(
            train_ds,
            batch_size=batch_size,
            num_workers=opts.num_workers,
            collate_fn=collate_fn,
            pin_memory=opts.pin_memory,
            finish=finish,
            **sampling,
        )
        valid = BatchLoader(
            valid_ds,
            batch_size=batch_size,
            shuffle=False,
            num_workers=opts.num_workers,
            collate_fn=collate_fn,
            pin_memory=opts.pin_memory,
            finish=finish,
        )
        return cls(train, valid)

    @classmethod
    def from_hf_dd(
        cls,
        dd: datasets.DatasetDict | datasets.IterableDatasetDict,
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
        size: int | tuple[int, int] | None = None,
        resize: Resize = "squish",
        in_memory: bool | None = None,
        cache: bool | str | os.PathLike[str] = True,
        decode_workers: int | None = None,
        device: str | torch.device | None = None,
        token_padding: TokenPadding = "batch",
        pad_token_id: int = 0,
        shuffle_buffer: int = 1000,
    ) -> DataLoaders:
        """Loaders over the image and label columns of `dd`'s train and valid splits, or over
        tokenized text: with no image column and token columns (`input_ids`, `attention_mask`,
        `token_type_ids`; or `x_col` a list of column names), each batch is a mapping
        `{"input_ids": ..., "attention_mask": ..., "labels": ...}` padded to the batch's longest
        row (the learner calls `model(input_ids=..., attention_mask=...)`).

        Images are decoded once (in `decode_workers` processes) to uint8, cached on disk, and
        made float32 in [0, 1] per batch. A streaming `IterableDatasetDict` gives loaders
        without a length, decoded as the rows arrive (see `nntrain.streaming`).

        Args:
            dd: a `DatasetDict` (or streaming `IterableDatasetDict`) with a "train" split and a
                "valid"/"validation"/"test" split.
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
            generator: random generator for the train sampler (a stream's shuffle seed).
            collate: "batched" decodes each split once and indexes whole batches; "per_item"
                collates decoded rows with `hf_ds_collate_fn` (slow; the reference).
            size: fit every image to this size, an int (square) or `(height, width)`, before
                caching; needed when the images differ in size.
            resize: how `size` fits an image: "squish" (resize), "crop" (cover, crop the
                centre) or "pad" (fit inside, pad with black).
            in_memory: hold the decoded images in memory (True) or leave them on disk, read per batch (False);
                None: in memory when they take at most half the available memory.
            cache: True: cache the decoded images next to the dataset's cache files (not for a
                dataset held only in memory); a directory: there; False: decode every time.
            decode_workers: processes that decode (None: one per core for large sets; 0: this one).
            device: where batches are made floats ("auto": CUDA when present); None: the CPU.
            token_padding: "batch" pads each batch to its longest row, "longest" every row to
                the split's longest.
            pad_token_id: the padding of `input_ids` (other token columns pad with 0).
            shuffle_buffer: rows in a stream's shuffle buffer.

        Raises:
            ValueError: bad `batch_size` or `collate`, a split or a column missing, images that
                differ in mode (or in size, without `size=`).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if collate not in ("batched", "per_item"):
            raise ValueError(f"collate must be 'batched' or 'per_item', got {collate!r}")
        hf = import_datasets()
        train_name, valid_name = find_splits(dd, valid_split)
        names = (train_name, valid_name)
        streaming = isinstance(dd[train_name], hf.IterableDataset)
        features = dd[train_name].features
        if features is None:
            raise ValueError(
                f"split {train_name!r} does not declare its features: give the stream its features "
                f"(ds.cast(datasets.Features(...)))"
            )
        opts = _LoaderOptions(shuffle, num_workers, drop_last, generator, _pin(device))
        spec = ImageSpec(size=as_size(size), resize=resize)  # checks size and resize up front

        def stream(name: str, ds: Any, make_batch: Any) -> StreamBatches:
            train = name == train_name
            return StreamBatches(
                ds,
                batch_size,
                make_batch,
                shuffle=shuffle and train,
                buffer_size=shuffle_buffer,
                drop_last=drop_last and train,
                generator=generator,
            )

        token_cols = token_columns(features, x_col)
        if token_cols:
            y = label_column(features, y_col)
            _check_rows(dd, names, [*token_cols, y])
            if streaming:
                if token_padding != "batch":
                    raise ValueError("token_padding='longest' needs the whole split: a stream pads per batch")
                rows = TokenRows(token_cols, y, pad_token_id)
                train_s, valid_s = (stream(n, dd[n].select_columns([*token_cols, y]), rows) for n in names)
                return cls._loaders(train_s, valid_s, None, opts)
            train_t, valid_t = (token_dataset(dd[n], token_cols, y, n, token_padding, pad_token_id) for n in names)
            return cls._loaders(train_t, valid_t, batch_size, opts)
        image_col, label_col = find_columns(features, x_col if isinstance(x_col, str) else None, y_col)
        _check_rows(dd, names, [image_col, label_col])
        spec = ImageSpec(features[image_col].mode, spec.size, resize)
        finish = UInt8ToFloat(device, flatten)
        if streaming:
            if collate != "batched":
                raise ValueError("collate='per_item' is for map-style splits; a stream is batched as it arrives")
            undecoded = hf.Image(mode=spec.mode, decode=False)
            images = ImageRows(image_col, label_col, spec)
            cells = {n: dd[n].select_columns([image_col, label_col]).cast_column(image_col, undecoded) for n in names}
            train_s, valid_s = (stream(n, cells[n], images) for n in names)
            return cls._loaders(train_s, valid_s, None, opts, finish)
        if collate == "per_item":
            # select_columns also orders the columns, so each row yields (image, label).
            train_r, valid_r = (dd[n].select_columns([image_col, label_col]) for n in names)
            first = [prepare_image(ds[0][image_col], spec).shape for ds in (train_r, valid_r)]
            check_same_shape(first[0], first[1], train_name, valid_name)
            collate_fn = partial(hf_ds_collate_fn, flatten=flatten, size=spec.size, resize=resize, mode=spec.mode)
            return cls._loaders(train_r, valid_r, batch_size, replace(opts, pin_memory=False), collate_fn=collate_fn)
        train_i, valid_i = (
            image_dataset(
                dd[n],
                image_col,
                _labels(dd[n], label_col),
                spec,
                flatten=flatten,
                in_memory=in_memory,
                cache=cache,
                workers=decode_workers,
            )
            for n in names
        )
        check_same_shape(train_i.image_shape, valid_i.image_shape, train_name, valid_name)
        return cls._loaders(train_i, valid_i, batch_size, opts, finish)
