"""Token columns (`input_ids`, `attention_mask`, ...) batched as mappings, padded per batch to
the batch's longest row (dynamic padding) unless asked to pad every row to the set's longest.

`PaddedTokenDataset` keeps each column as one flat tensor of all rows' tokens and the rows'
offsets, so a batch is one gather, whatever the rows' lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from nntrain.loaders import TensorDictDataset

__all__ = ["TokenPadding", "PaddedTokenDataset", "pad_rows", "token_dataset", "pad_values"]

TokenPadding = Literal["batch", "longest"]
"""`"batch"`: each batch is padded to its longest row; `"longest"`: every row to the set's longest."""


def pad_values(cols: Sequence[str], pad_token_id: int) -> dict[str, int]:
    """The value each column is padded with: `pad_token_id` for `input_ids`, 0 for the others
    (attention masks, token type ids)."""
    return {col: pad_token_id if col == "input_ids" else 0 for col in cols}


def pad_rows(rows: Sequence[Sequence[int]], pad: int, length: int | None = None) -> torch.Tensor:
    """`rows` as one int64 tensor, each padded with `pad` to `length` (default: the longest)."""
    length = max(map(len, rows), default=0) if length is None else length
    out = torch.full((len(rows), length), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class PaddedTokenDataset(Dataset):
    """Token columns of rows of different lengths and a target tensor; `__getitems__` serves
    a batch as `{name: (B, L) int64, ..., "labels": y}`, each column padded (with `pads[name]`)
    to `L`, the batch's longest row.

    Args:
        values: per column, every row's tokens concatenated (1-D int64).
        offsets: where each row starts in `values`, plus the end (N + 1 int64); one for all columns.
        y: the targets.
        pads: per column, the padding value.
    """

    def __init__(
        self, values: dict[str, torch.Tensor], offsets: torch.Tensor, y: torch.Tensor, pads: Mapping[str, int]
    ) -> None:
        if len(offsets) != len(y) + 1:
            raise ValueError(f"offsets must have one entry per row plus one ({len(y) + 1}), got {len(offsets)}")
        self.values, self.offsets, self.y, self.pads = values, offsets, y, dict(pads)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return {**{name: v[start:stop] for name, v in self.values.items()}, "labels": self.y[i]}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch at `indices`, padded to its longest row: one gather per column."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        longest = int(lengths.max()) if len(idx) else 0  # CPU tensors, in the loader: no device sync
        steps = torch.arange(longest)
        inside = steps < lengths[:, None]
        # positions past a row's end read its neighbour's tokens (kept inside `values`), then padded over
        where = (starts[:, None] + steps).clamp_(max=max(int(self.offsets[-1]) - 1, 0))
        batch = {name: torch.where(inside, v[where], self.pads[name]) for name, v in self.values.items()}
        return {**batch, "labels": self.y[idx]}


def _flat(column: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """An Arrow list column as (flat int64 values, int64 row offsets)."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column  # a ChunkedArray
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
    values = values[offsets[0] : offsets[-1]]  # a sliced column's values may start before its first row
    return torch.from_numpy(values), torch.from_numpy(offsets - offsets[0])


def token_dataset(
    ds: Any, cols: Sequence[str], y_col: str, split: str, padding: TokenPadding = "batch", pad_token_id: int = 0
) -> Dataset:
    """The token columns of split `ds` and its labels as a dataset of mapping batches: a
    `TensorDictDataset` when every row has one length (or `padding="longest"`), else a
    `PaddedTokenDataset` that pads each batch to its longest row.

    Raises:
        ValueError: the columns' rows differ in length from one column to another.
    """
    if padding not in ("batch", "longest"):
        raise ValueError(f"token_padding must be 'batch' or 'longest', got {padding!r}")
    table = ds.with_format("arrow")[:]
    flat = {col: _flat(table.column(col)) for col in cols}
    offsets = flat[cols[0]][1]
    for col in cols[1:]:
        if not torch.equal(flat[col][1], offsets):
            raise ValueError(
                f"columns {cols[0]!r} and {col!r} of split {split!r} have rows of different lengths: "
                f"tokenize them together"
            )
    labels = torch.from_numpy(table.column(y_col).to_numpy().astype(np.int64))
    lengths = offsets[1:] - offsets[:-1]
    padded = PaddedTokenDataset(
        {col: v for col, (v, _) in flat.items()}, offsets, labels, pad_values(cols, pad_token_id)
    )
    if padding == "longest" or len(lengths) == 0 or bool((lengths == lengths[0]).all()):  # dense, as before
        every = padded.__getitems__(range(len(labels)))
        return TensorDictDataset({col: every[col] for col in cols}, labels)
    return padded
