"""Decoded images kept as uint8, decoded once and cached on disk, served from memory or read
from the cache file per batch: `image_dataset` builds an `ImageArrayDataset` for an image column.

The cache is a `.npy` file of shape (N, C, H, W) next to the dataset's own cache files, named
by the dataset's fingerprint, its length, the column and the decoding options (mode, size,
resize), so a second run opens it at once and other options build another. Left on disk
(`DiskArray`), a batch's rows are read into the batch and nothing else stays in the process, so
a set larger than RAM trains with bounded memory (the kernel's page cache keeps what it can).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nntrain.images import ImageSpec, decode_column

__all__ = [
    "ImageArrayDataset",
    "DiskArray",
    "image_dataset",
    "cache_path",
    "available_memory",
    "CACHE_FORMAT",
    "MEMORY_SHARE",
]

CACHE_FORMAT = 1
"""Part of every cache key: a new layout builds new files."""

MEMORY_SHARE = 0.5
"""`in_memory=None` holds the images in memory when they take at most this share of the
available memory; else it leaves them on disk (`DiskArray`)."""


def available_memory() -> int:
    """Bytes of memory available to new allocations (`MemAvailable`, else the free pages)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: assume plenty


class DiskArray:
    """A uint8 `.npy` array left on disk: `take` reads just the rows asked for, one positioned
    read each (`os.preadv`, straight into the batch), so the file's pages stay in the kernel's
    page cache and out of the process's resident memory. Each process (DataLoader workers too)
    opens its own descriptor. Without `os.preadv` (Windows) it reads through a memory map.

    Not a memory map where it can help it: a mapped page stays resident in the process once
    read, and recent kernels map a whole large folio (hundreds of KiB) on a fault, so a few
    batches of random rows map most of the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if dtype != np.uint8 or fortran:
            raise ValueError(f"{self.path} is not a C-ordered uint8 array")
        self.shape: tuple[int, ...] = tuple(shape)
        self.nbytes = int(np.prod(shape))
        self.row_bytes = int(np.prod(shape[1:]))
        self._open_in: int | None = None  # the pid that opened `_fd` (or `_mapped`)
        self._fd = -1
        self._mapped: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _open(self) -> None:
        if hasattr(os, "preadv"):
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            weakref.finalize(self, os.close, self._fd)
        else:
            self._mapped = np.load(self.path, mmap_mode="r")
        self._open_in = os.getpid()

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (in `idx`'s order), read from the file."""
        if self._open_in != os.getpid():
            self._open()
        if self._mapped is not None:
            return np.asarray(self._mapped[idx])
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        rows = out.reshape(len(idx), self.row_bytes)
        fd, offset, size = self._fd, self.offset, self.row_bytes
        for k, i in enumerate(idx.tolist()):
            if os.preadv(fd, [rows[k]], offset + i * size) != size:
                raise OSError(f"{self.path} ends before row {i}: the cache file was cut short; delete it to rebuild it")
        return out

    def load(self) -> np.ndarray:
        """The whole array, read into memory."""
        return np.load(self.path)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open_in": None, "_fd": -1, "_mapped": None}


class ImageArrayDataset(Dataset):
    """uint8 images (N, C, H, W), in memory (a numpy array) or on disk (`DiskArray`),
    and int64 labels; `__getitems__` serves a whole uint8 batch `(images[idx], labels[idx])`,
    which the loader's `UInt8ToFloat` turns into floats (on the device when it has one).

    With `load=True`, a `DiskArray` is read into memory when the first pass over the dataset
    starts (`start_epoch`, which `BatchLoader` calls in the main process before its workers
    fork, so they share that one copy): a validation split is then read when it is first used,
    not before the first training batch.

    `x` and `y` are the whole set as float32 in [0, 1] (flattened when `flatten`) and the
    labels, for code that wants every sample as one tensor (`nntrain.fastpath.to_device_loaders`).
    """

    def __init__(
        self, images: np.ndarray | DiskArray, labels: torch.Tensor, flatten: bool = False, load: bool = False
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"images and labels must have the same length, got {len(images)} and {len(labels)}")
        self.images = images
        self.labels = labels
        self.flatten = flatten
        self.load = load

    @property
    def in_memory(self) -> bool:
        """Whether the images are (or, with `load`, will be from the first pass) held in memory;
        else they are read from disk per batch."""
        return isinstance(self.images, np.ndarray) or self.load

    def start_epoch(self) -> None:
        """Read the images into memory, with `load`, before the first pass."""
        if self.load and isinstance(self.images, DiskArray):
            self.images = self.images.load()

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One image's shape, (C, H, W)."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        return self.images[idx] if isinstance(self.images, np.ndarray) else self.images.take(idx)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `i` as `(uint8 image (C, H, W), label)`."""
        return torch.from_numpy(self._take(np.asarray([i]))[0]), self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at `indices` as `(uint8 images (B, C, H, W), labels)`: one gather each."""
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self._take(idx)), self.labels[torch.from_numpy(idx)]

    @property
    def x(self) -> torch.Tensor:
        """Every image as float32 in [0, 1]: (N, C, H, W), or (N, C*H*W) when `flatten`."""
        self.start_epoch()
        arr = self.images if isinstance(self.images, np.ndarray) else self.images.load()
        x = torch.from_numpy(arr).to(torch.float32).div_(255)
        return x.reshape(len(x), -1) if self.flatten else x

    @property
    def y(self) -> torch.Tensor:
        """The labels."""
        return self.labels


def cache_path(ds: Any, col: str, spec: ImageSpec, cache: bool | str | os.PathLike[str]) -> Path | None:
    """Where the decoded images of column `col` of `ds` are cached: in `cache` (a directory), or
    with `cache=True` next to the dataset's cache files (None for a dataset held in memory,
    whose fingerprint changes from run to run); None with `cache=False`."""
    if cache is False:
        return None
    if cache is True:
        files = [f["filename"] for f in getattr(ds, "cache_files", None) or []]
        if not files:
            return None
        directory = Path(files[0]).parent
    else:
        directory = Path(cache)
    key = f"{CACHE_FORMAT}|{ds._fingerprint}|{len(ds)}|{col}|{spec.key}"
    return directory / f"nntrain-images-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` + ".lock" (one process builds a cache file; another,
    a DDP rank, waits and then opens it). Without `fcntl`, no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_npy(ds: Any, col: str, spec: ImageSpec, path: Path, workers: int | None) -> None:
    """Decode the column into a `.npy` file at `path`, written under a temporary name and then
    renamed, so a file at `path` is always whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:

            def start(shape: tuple[int, ...]) -> None:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})

            decode_column(ds, col, spec, start, lambda part: part.tofile(f), workers)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _decode_in_memory(ds: Any, col: str, spec: ImageSpec, workers: int | None) -> np.ndarray:
    """Decode the column into one array in memory."""
    held: dict[str, Any] = {"pos": 0}

    def start(shape: tuple[int, ...]) -> None:
        held["array"] = np.empty(shape, np.uint8)

    def write(part: np.ndarray) -> None:
        held["array"][held["pos"] : held["pos"] + len(part)] = part
        held["pos"] += len(part)

    decode_column(ds, col, spec, start, write, workers)
    return held["array"]


def _unlink_if_mine(path: str, pid: int) -> None:
    if os.getpid() == pid:  # not from a forked worker
        with contextlib.suppress(OSError):
            os.unlink(path)


def _temporary_file(ds: Any, col: str, spec: ImageSpec, workers: int | None) -> DiskArray:
    """Decode the column into a temporary file, left on disk, deleted with the array."""
    fd, name = tempfile.mkstemp(prefix="nntrain-images-", suffix=".npy")
    os.close(fd)
    path = Path(name)
    _write_npy(ds, col, spec, path, workers)
    arr = DiskArray(path)
    weakref.finalize(arr, _unlink_if_mine, name, os.getpid())
    return arr


def image_dataset(
    ds: Any,
    x_col: str,
    labels: torch.Tensor,
    spec: ImageSpec,
    *,
    flatten: bool,
    in_memory: bool | None,
    cache: bool | str | os.PathLike[str],
    workers: int | None,
) -> ImageArrayDataset:
    """The `ImageArrayDataset` of image column `x_col` of `ds`: decoded once (by `workers`
    processes) into the cache, or opened from it, and held in memory or left on disk
    (`in_memory`; None: in memory when it takes at most `MEMORY_SHARE` of the available memory)."""
    path = cache_path(ds, x_col, spec, cache)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                if not path.exists():
                    _write_npy(ds, x_col, spec, path, workers)
        except OSError as exc:
            import warnings

            warnings.warn(
                f"cannot cache the decoded images in {path.parent} ({exc}); decoding without a cache "
                f"(pass cache=<a writable directory>)",
                RuntimeWarning,
                stacklevel=3,
            )
            path = None
    if path is not None:
        mapped = DiskArray(path)
        keep = in_memory if in_memory is not None else mapped.nbytes <= MEMORY_SHARE * available_memory()
        return ImageArrayDataset(mapped, labels, flatten, load=keep)
    if in_memory is False:
        return ImageArrayDataset(_temporary_file(ds, x_col, spec, workers), labels, flatten)
    return ImageArrayDataset(_decode_in_memory(ds, x_col, spec, workers), labels, flatten)
