"""Streaming splits (`load_dataset(..., streaming=True)`, an `IterableDatasetDict`): batches
made from the rows as they arrive, with no length (`n_batches` is None).

`StreamBatches` draws a shuffle seed from torch's RNG as each pass starts (so `torch.manual_seed`
sets the order, and a resumed epoch redraws it), shuffles with Hugging Face's buffer
(`buffer_size` rows: an approximate shuffle), and under DDP keeps its rank's part
(`datasets.distributed.split_dataset_by_node`: whole shards when their number divides by the
world size, else every world-size-th row). Images are decoded exactly as the cached path
decodes them (`prepare_image`); token rows are padded per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from nntrain.images import ImageSpec, _differ, prepare_image
from nntrain.tokens import pad_rows, pad_values

__all__ = ["StreamBatches", "ImageRows", "TokenRows", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (`torch.distributed`; (0, 1) outside DDP)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ImageRows:
    """Rows `{x_col: image cell, y_col: label}` to a batch `(uint8 (B, C, H, W), int64 labels)`."""

    def __init__(self, x_col: str, y_col: str, spec: ImageSpec) -> None:
        self.x_col, self.y_col, self.spec = x_col, y_col, spec

    def __call__(self, rows: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = [prepare_image(row[self.x_col], self.spec) for row in rows]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise _differ(self.x_col, {f"{s[2]} channel(s)" for s in shapes}, {s[:2] for s in shapes}) or ValueError(
                f"images in column {self.x_col!r} differ in shape {sorted(shapes)[:4]}"
            )
        x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
        return x, torch.tensor([row[self.y_col] for row in rows], dtype=torch.long)


class TokenRows:
    """Rows of token columns and a label to a mapping batch, each column padded to the batch's
    longest row (`pad_values`)."""

    def __init__(self, cols: Sequence[str], y_col: str, pad_token_id: int = 0) -> None:
        self.cols, self.y_col, self.pads = list(cols), y_col, pad_values(cols, pad_token_id)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {col: pad_rows([row[col] for row in rows], self.pads[col]) for col in self.cols}
        return {**batch, "labels": torch.tensor([row[self.y_col] for row in rows], dtype=torch.long)}


class StreamBatches(IterableDataset):
    """Batches of `batch_size` rows of a Hugging Face `IterableDataset`, made by `make_batch`.

    Serve it with `batch_size=None` from a `BatchLoader` or `ResumableDataLoader`, which call
    `start_epoch` as each pass starts, in the main process: the shuffle seed comes from torch's
    RNG (or `generator`) there, and the rank's shard is chosen there. With DataLoader workers,
    Hugging Face gives each worker its own shards (have at least as many shards as workers).

    Args:
        ds: the split.
        batch_size: rows per batch.
        make_batch: rows to a batch (`ImageRows`, `TokenRows`).
        shuffle: shuffle each pass with a buffer of `buffer_size` rows.
        buffer_size: rows held by the shuffle buffer.
        drop_last: drop a last, smaller batch.
        generator: the generator the shuffle seed is drawn from (default torch's global one).
    """

    def __init__(
        self,
        ds: Any,
        batch_size: int,
        make_batch: Callable[[list[dict[str, Any]]], Any],
        shuffle: bool = False,
        buffer_size: int = 1000,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.ds, self.batch_size, self.make_batch = ds, batch_size, make_batch
        self.shuffle, self.buffer_size, self.drop_last, self.generator = shuffle, buffer_size, drop_last, generator
        self._source: Any = None

    def start_epoch(self) -> None:
        """Choose this pass's rows: this rank's part, shuffled by a seed drawn now."""
        source = self.ds
        rank, world = rank_and_world()
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            source = split_dataset_by_node(source, rank=rank, world_size=world)
        if self.shuffle:
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator)) % 2**32
            source = source.shuffle(seed=seed, buffer_size=self.buffer_size)
        self._source = source

    def __iter__(self) -> Iterator[Any]:
        if self._source is None:
            self.start_epoch()
        rows: list[dict[str, Any]] = []
        for row in self._source:
            rows.append(row)
            if len(rows) == self.batch_size:
                yield self.make_batch(rows)
                rows = []
        if rows and not self.drop_last:
            yield self.make_batch(rows)
