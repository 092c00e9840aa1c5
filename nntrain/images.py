"""Image decoding: one image to a uint8 array of one mode and size (`prepare_image`), a whole
column decoded in chunks, in worker processes (`decode_column`), and the per-item collate
(`hf_ds_collate_fn`), the slow reference path.

Every path goes through `prepare_image`, so the cached arrays, the streamed batches and the
per-item batches hold the same pixels.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:  # PIL is imported where it is used: `import nntrain` stays fast
    from PIL import Image

__all__ = [
    "Resize",
    "ImageSpec",
    "as_size",
    "open_image",
    "image_array",
    "prepare_image",
    "decode_column",
    "hf_ds_collate_fn",
]

Resize = Literal["squish", "crop", "pad"]
"""How `size=` fits an image: "squish" resizes to the size (the aspect ratio may change);
"crop" scales the image to cover the size, then crops the centre (fastai's default); "pad"
scales it to fit inside, then pads with black."""

CHUNK = 512
"""Rows read from the Arrow table and decoded as one task."""


def as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """`size` as `(height, width)`: an int is a square; None stays None.

    Raises:
        ValueError: not a positive int or a pair of them.
    """
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, Sequence) else ()
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ValueError(f"size must be a positive int or a (height, width) pair of them, got {size!r}")
    return pair[0], pair[1]


class ImageSpec:
    """How a column's images are decoded: into `mode` (None: as stored, which must then be one
    mode) and to `size` `(height, width)` with `resize` (None: as stored, which must then be one
    size). Its `key` names it in the cache."""

    def __init__(self, mode: str | None = None, size: tuple[int, int] | None = None, resize: Resize = "squish") -> None:
        if resize not in ("squish", "crop", "pad"):
            raise ValueError(f"resize must be 'squish', 'crop' or 'pad', got {resize!r}")
        self.mode, self.size, self.resize = mode, size, resize

    @property
    def key(self) -> str:
        """The decoding options as text, part of the cache key."""
        return f"mode={self.mode},size={self.size},resize={self.resize if self.size else None}"


def open_image(cell: Any) -> Image.Image:
    """A PIL image from an Arrow image cell (`{"bytes": ..., "path": ...}`) or a PIL image."""
    from PIL import Image

    if isinstance(cell, Image.Image):
        return cell
    if cell.get("bytes") is not None:
        return Image.open(io.BytesIO(cell["bytes"]))
    return Image.open(cell["path"])


def image_array(img: Image.Image) -> np.ndarray:
    """`img` as a uint8 array of shape (H, W, C)."""
    arr = np.array(img)  # a writable copy: torch warns on read-only arrays
    if arr.dtype != np.uint8:
        raise ValueError(
            f"image mode {img.mode!r} decodes to {arr.dtype}, not uint8; convert the images to 'L' or "
            f"'RGB' first (e.g. dd.cast_column(col, datasets.Image(mode='L')))"
        )
    return arr[:, :, None] if arr.ndim == 2 else arr


def _fit(img: Image.Image, size: tuple[int, int], resize: Resize) -> Image.Image:
    from PIL import Image, ImageOps

    h, w = size
    if img.size == (w, h):
        return img
    if resize == "crop":
        return ImageOps.fit(img, (w, h), method=Image.Resampling.BILINEAR)
    if resize == "pad":
        return ImageOps.pad(img, (w, h), method=Image.Resampling.BILINEAR, color=0)
    return img.resize((w, h), Image.Resampling.BILINEAR)


def prepare_image(cell: Any, spec: ImageSpec) -> np.ndarray:
    """One image (an Arrow cell or a PIL image) converted to `spec.mode` and fitted to
    `spec.size`, as a uint8 array (H, W, C)."""
    img = open_image(cell)
    if spec.mode is not None and img.mode != spec.mode:
        img = img.convert(spec.mode)
    if spec.size is not None:
        img = _fit(img, spec.size, spec.resize)
    return image_array(img)


def _differ(col: str, modes: set[str], sizes: set[tuple[int, ...]]) -> ValueError | None:
    """The error, with its fix, for a column whose images differ in mode or size; else None."""
    if len(modes) > 1:
        return ValueError(
            f"images in column '{col}' have different modes {sorted(modes)}; convert them to one mode first "
            f"(dd.cast_column({col!r}, datasets.Image(mode='RGB')), or 'L' for grayscale)"
        )
    if len(sizes) > 1:
        return ValueError(
            f"images in column '{col}' have different sizes (height, width) {sorted(sizes)[:4]}; resize them "
            f"to one size: pass size=(height, width) (or an int), with resize='squish', 'crop' or 'pad'"
        )
    return None


def _decode_chunk(cells: list[Any], spec: ImageSpec, shape: tuple[int, ...]) -> np.ndarray | tuple[set, set]:
    """Decode `cells` into one (N, C, H, W) uint8 array of images of `shape` (H, W, C); when an
    image has another shape, the modes and sizes seen instead (a worker's answer)."""
    out = np.empty((len(cells), shape[2], shape[0], shape[1]), np.uint8)
    for i, cell in enumerate(cells):
        arr = prepare_image(cell, spec)
        if arr.shape != shape:
            return _seen(cells, spec)
        out[i] = arr.transpose(2, 0, 1)
    return out


def _mode_and_size(cell: Any, spec: ImageSpec) -> tuple[str, tuple[int, int]]:
    """The mode and (height, width) `cell` decodes to under `spec`."""
    img = open_image(cell)
    h, w = prepare_image(img, spec).shape[:2]
    return spec.mode or img.mode, (h, w)


def _seen(cells: list[Any], spec: ImageSpec) -> tuple[set, set]:
    """The modes and sizes `cells` decode to."""
    seen = [_mode_and_size(cell, spec) for cell in cells]
    return {m for m, _ in seen}, {s for _, s in seen}


def _cells(ds: Any, col: str, start: int, stop: int) -> list[Any]:
    """Rows `start:stop` of image column `col` as Arrow cells (the table read skips datasets'
    per-row formatting; slicing applies any index mapping)."""
    return ds.with_format("arrow", columns=[col])[start:stop].column(col).to_pylist()


def decode_workers(n_rows: int, workers: int | None) -> int:
    """How many processes decode `n_rows` images: `workers`, or by default one per core (at most
    8) for sets of several chunks; 0 or 1 decodes in this process."""
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
        if n_rows < 4 * CHUNK:
            workers = 0  # a pool costs more than it saves
    return max(int(workers), 0)


def decode_column(
    ds: Any,
    col: str,
    spec: ImageSpec,
    start: Callable[[tuple[int, ...]], None],
    write: Callable[[np.ndarray], None],
    workers: int | None = None,
) -> None:
    """Decode image column `col` of dataset `ds` in chunks, in order: `start` is told the
    whole column's shape (N, C, H, W) once the first image is decoded, then `write` gets each
    chunk as a (n, C, H, W) uint8 array; `workers` processes decode (see `decode_workers`).

    Raises:
        ValueError: the images differ in mode or size (naming them, and the fix).
    """
    n = len(ds)
    first = _cells(ds, col, 0, 1)[0]
    shape = prepare_image(first, spec).shape
    start((n, shape[2], shape[0], shape[1]))
    ranges = [(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]
    for part in _decoded(ds, col, spec, shape, ranges, decode_workers(n, workers)):
        if isinstance(part, tuple):
            mode, size = _mode_and_size(first, spec)
            raise _differ(col, part[0] | {mode}, part[1] | {size}) or ValueError(
                f"images in column '{col}' decode to different shapes; convert them to one mode"
            )
        write(part)


_FORKED: tuple[Any, str] | None = None
"""The dataset and column forked decoding workers read their rows from (set while a pool runs)."""


def _decode_rows(start: int, stop: int, spec: ImageSpec, shape: tuple[int, ...]) -> np.ndarray | tuple[set, set]:
    """`_decode_chunk` of rows `start:stop` of the dataset inherited from the parent (`_FORKED`):
    the worker reads the Arrow table itself, so the parent neither copies nor maps the bytes."""
    assert _FORKED is not None, "a forked decoding worker without its dataset"
    ds, col = _FORKED
    return _decode_chunk(_cells(ds, col, start, stop), spec, shape)


def _decoded(
    ds: Any, col: str, spec: ImageSpec, shape: tuple[int, ...], ranges: list[tuple[int, int]], workers: int
) -> Iterator[np.ndarray | tuple[set, set]]:
    """Each range's decoded chunk, in order; with `workers`, at most 2 * `workers` chunks in
    flight. Forked workers read their rows from the dataset they inherit; spawned ones get them."""
    global _FORKED
    if workers <= 1:
        for start, stop in ranges:
            yield _decode_chunk(_cells(ds, col, start, stop), spec, shape)
        return
    fork = "fork" in multiprocessing.get_all_start_methods()

    def task(pool: ProcessPoolExecutor, start: int, stop: int) -> Future:
        if fork:
            return pool.submit(_decode_rows, start, stop, spec, shape)
        return pool.submit(_decode_chunk, _cells(ds, col, start, stop), spec, shape)

    _FORKED = (ds, col) if fork else None  # before the pool forks its workers
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork" if fork else None)) as pool:
            todo = iter(ranges)
            pending = [task(pool, *r) for _, r in zip(range(2 * workers), todo)]
            while pending:
                part = pending.pop(0).result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(task(pool, *nxt))
                yield part
    finally:
        _FORKED = None


def _image_to_tensor(arr: np.ndarray, flatten: bool) -> torch.Tensor:
    """One (H, W, C) uint8 image as float32 in [0, 1], shape (C, H, W), or (C*H*W,) when `flatten`."""
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return t.reshape(-1) if flatten else t


def hf_ds_collate_fn(
    batch: Sequence[Mapping[str, Any]],
    flatten: bool = True,
    size: int | Sequence[int] | None = None,
    resize: Resize = "squish",
    mode: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """Collate dataset rows one value at a time: images (PIL, or Arrow cells) to float tensors,
    other values via `torch.tensor`.

    The slow per-item path; `DataLoaders.from_hf_dd(collate="per_item")` uses it.

    Args:
        batch: rows (dicts) of a Hugging Face dataset, images decoded to PIL.
        flatten: images become (C*H*W,) vectors instead of (C, H, W).
        size: fit every image to this size (see `from_hf_dd`).
        resize: how `size` fits an image ("squish", "crop" or "pad").
        mode: convert every image to this PIL mode.

    Returns:
        One stacked tensor per column, in the rows' column order.
    """
    from PIL import Image

    spec = ImageSpec(mode, as_size(size), resize)

    def to_tensor(value: Any) -> torch.Tensor:
        if isinstance(value, Image.Image) or (isinstance(value, dict) and "bytes" in value):
            return _image_to_tensor(prepare_image(value, spec), flatten)
        return torch.tensor(value)

    columns = zip(*(row.values() for row in batch))
    out = []
    for i, col in enumerate(columns):
        values = [to_tensor(v) for v in col]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"the batch's column {i} holds items of different shapes {sorted(shapes)[:4]}: make the "
                f"images one mode and size (convert; or pass size=) before batching"
            )
        out.append(torch.stack(values))
    return tuple(out)
