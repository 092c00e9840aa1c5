"""Checkpoint files: atomic writes, one writer per directory, listing, pruning, reading.

Files are written to a temporary file in the target directory, flushed and fsync'd, then renamed
over the target with `os.replace` and the directory fsync'd, so a crash leaves either the old
file or the new one, never half of one. What a checkpoint holds is `nntrain.checkpoint_state`'s.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "ResumeRefused",
    "PATTERN",
    "atomic_write",
    "DirectoryLock",
    "sigint_deferred",
    "remove_stale_temporaries",
    "remove_stale_temporaries_of",
    "save_checkpoint",
    "read_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "checkpoint_name",
]

PATTERN = "ckpt-*"
"""Glob matching the files `CheckpointS` writes (and `latest_checkpoint` considers): `.pt` from
the native engine, `.ckpt` (Lightning checkpoints) from the Lightning engine."""

SUFFIXES = (".pt", ".ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: unreadable, truncated, incomplete or for another model."""


class ResumeRefused(ValueError):
    """A subscriber refuses to continue a saved run the way this fit asks (its `load_state_dict`
    raises it; the message says what to change). Passed on as it is, not as a `CheckpointError`."""


def checkpoint_name(global_step: int, epoch: int, iter_: int | None, suffix: str = ".pt") -> str:
    """File name sorting in training order: by step, then epoch, then batch (`end` after batches)."""
    pos = "end" if iter_ is None else f"b{iter_:07d}"
    return f"ckpt-s{global_step:010d}-e{epoch:06d}-{pos}{suffix}"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TEMPORARY_PATTERN = ".ckpt-*.tmp"
"""Glob of the temporary files `atomic_write` makes for checkpoints (a SIGKILL mid-write leaves one)."""


def _exclusive_temporary(path: Path) -> Path:
    """A new empty file next to `path` with an unpredictable name, created exclusively and never
    through a symbolic link (`O_EXCL | O_NOFOLLOW`), so nothing planted in the directory is written."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, flags, 0o600))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def sigint_deferred() -> Any:
    """Hold a Ctrl-C that lands inside the block until the block ends, then raise it (in the main
    thread, where Python delivers SIGINT; elsewhere nothing changes)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _write_failed(path: Path, exc: Exception) -> CheckpointError:
    """The error for a failed write of `path`, saying so when the disk is full."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(exc, "errno", None) == 28 or (free is not None and free < (64 << 20))
    note = (
        f"; the disk holding {path.parent} is full ({free} bytes free): free space or checkpoint elsewhere"
        if full
        else ""
    )
    return CheckpointError(f"could not write checkpoint {path}: {type(exc).__name__}: {exc}{note}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], commit: bool = True) -> Path:
    """Make the file at `path` appear whole or not at all: `write(tmp)` writes a temporary file
    next to it (created exclusively, with an unpredictable name, never through a link), which is
    fsync'd and renamed over `path` (`os.replace`: a link at `path` is replaced, not followed),
    then the directory is fsync'd. A Ctrl-C landing during the write is held until the file is
    in place, then raised. `commit=False` (a process that only takes part in a collective
    write, like a non-zero DDP rank) calls `write` and leaves the file alone.

    Raises:
        CheckpointError: the write failed (naming the path, and a full disk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not commit:
        write(path.parent / f".{path.name}.{os.getpid()}.tmp")
        return path
    with sigint_deferred():
        tmp = _exclusive_temporary(path)
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            traceback.clear_frames(exc.__traceback__)  # the writer's frames hold the open file: free the disk now
            raise _write_failed(path, exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in `directory` (call it holding the
    directory's `DirectoryLock`, so no write is in progress); return them."""
    directory = Path(directory)
    stale = sorted(directory.glob(TEMPORARY_PATTERN)) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def remove_stale_temporaries_of(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers of `path` (`atomic_write`, e.g. `SaveBestS`'s
    best-weights file) left when they were killed: those of processes no longer running."""
    path = Path(path)
    stale = []
    for tmp in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")) if path.parent.is_dir() else []:
        pid = tmp.name[len(path.name) + 2 :].split(".")[0]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            stale.append(tmp)
    return stale


def _running(pid: int) -> bool:
    """Whether a process `pid` runs on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """An advisory lock (`fcntl.flock`) on `<directory>/.nntrain.lock`: one checkpoint writer
    per directory. Where `fcntl` is missing (Windows) it locks nothing."""

    NAME = ".nntrain.lock"

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or fail at once.

        Raises:
            RuntimeError: another process (or another writer in this one) holds it.
        """
        try:
            import fcntl
        except ImportError:
            return
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"another fit is writing checkpoints to {self.path.parent} (it holds {self.path}, "
                f"pid {holder}): give this CheckpointS another directory, or wait for that fit "
                f"to end"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint files in `directory`, oldest first (by name, which sorts in training order)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(PATTERN) if p.suffix in SUFFIXES)


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints in `directory`; return the deleted paths."""
    paths = list_checkpoints(directory)
    doomed = paths[:-keep] if keep > 0 else paths
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def _load_failure(exc: Exception) -> str:
    """Why `torch.load(weights_only=True)` failed, in nntrain's words (not torch's advice to
    unpickle arbitrary objects, which nntrain never does)."""
    text = str(exc)
    if "Unsupported global" in text:
        return (
            "it holds Python objects other than tensors and plain values, which nntrain does not unpickle "
            "(a file from another program, or one nntrain did not write)"
        )
    detail = "" if "weights_only" in text or not text else f": {text.splitlines()[0][:200]}"
    return (
        f"not a file torch.save wrote whole (corrupt, truncated, or another kind of file; {type(exc).__name__}{detail})"
    )


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The dict saved at `path` (tensors and plain values only: `weights_only=True`).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or holds no dict.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint file at {path}") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {_load_failure(exc)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a dict but a {type(state).__name__}")
    return state
