"""Checkpoint mechanics as plain functions: atomic save, keep-last-K, checked load, RNG capture.

A native checkpoint is one `torch.save`d dict (see `REQUIRED_KEYS`); a Lightning checkpoint
written through the bridge carries the same learner state under its `"nntrain"` entry. Files are written to a temporary
file in the target directory, flushed and fsync'd, then renamed over the target with
`os.replace` and the directory fsync'd, so a crash leaves either the old file or the new one,
never half of one. `latest_checkpoint` skips (with a warning) a file that does not load.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "REQUIRED_KEYS",
    "atomic_write",
    "DirectoryLock",
    "sigint_deferred",
    "remove_stale_temporaries",
    "save_checkpoint",
    "load_checkpoint",
    "is_lightning_checkpoint",
    "find_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "checkpoint_name",
    "rng_state",
    "set_rng_state",
    "model_mismatch",
    "check_model",
    "check_optimizer",
    "set_grads",
    "subscriber_states",
    "load_subscriber_states",
    "learner_state",
    "native_checkpoint",
    "ResumePlan",
    "resumed_batches",
    "LEARNER_KEYS",
    "WEIGHTS_FORMAT",
    "save_weights",
    "load_weights",
]

LEARNER_KEYS: tuple[str, ...] = ("format", "grads", "global_step", "position", "rng", "epoch_rng", "subs")
"""The learner state a checkpoint holds besides the weights and optimizer: the whole of a
Lightning checkpoint's `"nntrain"` entry, and with `"model"` and `"optimizer"` a native checkpoint.

- `format`: this layout's version (`FORMAT`).
- `grads`: each parameter's `.grad` (None or a tensor), in `model.parameters()` order.
- `global_step`: optimizer steps taken.
- `position`: `{"epoch": e, "iter": i}`, the last trained batch `i` of epoch `e`, or `i` None
  at the end of epoch `e` (after its training pass, and validation if any).
- `rng`: `rng_state()` at the save; `epoch_rng`: at the start of epoch `e`'s training pass
  (None at an epoch's end or where the loader keeps its own order, Lightning).
- `subs`: each subscriber's `state_dict()` by `"<ClassName>#<k>"` (k-th of its class).

A Lightning checkpoint of several DDP ranks also holds `ranks`: each rank's `{"subs", "rng"}`
(rank r's at index r; the entries above are rank 0's), so a resume inside an epoch gives
every rank its own partial-epoch state.
"""

FORMAT = 2

REQUIRED_KEYS: tuple[str, ...] = ("model", "optimizer", *LEARNER_KEYS)
"""Keys every native checkpoint holds; a file missing one is reported as corrupt."""

PATTERN = "ckpt-*"
"""Glob matching the files `CheckpointS` writes (and `latest_checkpoint` considers): `.pt` from
the native engine, `.ckpt` (Lightning checkpoints) from the Lightning engine."""

SUFFIXES = (".pt", ".ckpt")

CHECKPOINT_ENTRY = "nntrain"
"""The entry of a Lightning checkpoint that holds the learner state (`LEARNER_KEYS`)."""

LIGHTNING_KEYS: tuple[str, ...] = ("state_dict", CHECKPOINT_ENTRY)
"""Keys a Lightning checkpoint written through the bridge holds (see `is_lightning_checkpoint`)."""



class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: unreadable, truncated, incomplete or for another model."""


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
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
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
    note = f"; the disk holding {path.parent} is full ({free} bytes free): free space or checkpoint " \
           f"elsewhere" if full else ""
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
            raise RuntimeError(f"another fit is writing checkpoints to {self.path.parent} (it holds {self.path}, "
                               f"pid {holder}): give this CheckpointS another directory, or wait for that fit "
                               f"to end") from None
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


def is_lightning_checkpoint(state: dict[str, Any]) -> bool:
    """Whether `state` (a loaded checkpoint) is a Lightning checkpoint rather than a native one."""
    return "pytorch-lightning_version" in state or "state_dict" in state


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint: a native one written by `save_checkpoint`, or a Lightning one
    written while training a `LearnerModule` (tensors and plain values only: `weights_only=True`).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or lacks a required key.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint file at {path}") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded (corrupt or truncated?): "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a dict but a {type(state).__name__}")
    if is_lightning_checkpoint(state):
        missing = [k for k in LIGHTNING_KEYS if k not in state]
        if CHECKPOINT_ENTRY in state:
            missing += [f"nntrain.{k}" for k in LEARNER_KEYS if k not in state[CHECKPOINT_ENTRY]]
        if missing:
            raise CheckpointError(f"Lightning checkpoint {path} lacks nntrain's learner state (missing "
                                  f"{missing}): was it written while training an nntrain learner?")
        return state
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    return state


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint files in `directory`, oldest first (by name, which sorts in training order)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(PATTERN) if p.suffix in SUFFIXES)


def latest_checkpoint(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `directory` that loads, as `(path, state)`, or None if none does.

    A newer file that does not load is skipped with a `warnings.warn` naming it.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping unusable checkpoint {path}: {exc}", RuntimeWarning, stacklevel=2)
    return None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints in `directory`; return the deleted paths."""
    paths = list_checkpoints(directory)
    doomed = paths[:-keep] if keep > 0 else paths
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def rng_state() -> dict[str, Any]:
    """The states of Python's `random`, numpy's global generator (if numpy is present), torch's CPU
    generator and every CUDA device's (when CUDA is initialised), in `weights_only`-loadable types."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from `rng_state()`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss_value = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss_value))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_mismatch(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between `model`'s state dict and `saved` (empty when they match)."""
    own = model.state_dict()
    problems = [f"missing in checkpoint: {k}" for k in own if k not in saved]
    problems += [f"not in model: {k}" for k in saved if k not in own]
    problems += [f"shape of {k}: model {tuple(own[k].shape)}, checkpoint {tuple(saved[k].shape)}"
                 for k in own if k in saved and hasattr(saved[k], "shape") and own[k].shape != saved[k].shape]
    return problems


# ----- resuming a learner ----------------------------------------------------------------------


def find_checkpoint(learn: Any, resume: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `resume` names, loaded and checked, as `(path, state)`.

    Args:
        learn: the learner (its `CheckpointS` gives the directory for "last").
        resume: a file, a directory (its newest loadable file), or "last" (the newest in the
            directory of the attached `CheckpointS`).

    Returns:
        None when `resume="last"` finds no checkpoint.

    Raises:
        CheckpointError: unreadable or incomplete, or no loadable file in a named directory.
        ValueError: `resume="last"` without a `CheckpointS` attached.
    """
    if resume == "last":
        dirs = [sub.dir for sub in learn.subs if getattr(sub, "is_checkpointer", False)]
        if not dirs:
            raise ValueError('resume="last" needs a CheckpointS among the subscribers (or pass a path)')
        if os.path.exists(dirs[0]) and not os.path.isdir(dirs[0]):
            raise CheckpointError(f'resume="last": the CheckpointS directory {dirs[0]} is a file, not a directory')
        return latest_checkpoint(dirs[0])
    if os.path.isdir(resume):
        found = latest_checkpoint(resume)
        if found is None:
            raise CheckpointError(f"no loadable checkpoint in {resume}")
        return found
    return Path(resume), load_checkpoint(resume)


def check_model(learn: Any, path: str | os.PathLike, weights: dict[str, torch.Tensor]) -> None:
    """Raise a `CheckpointError` listing the keys and shapes in which `weights` (from the file at
    `path`) differ from `learn.model`'s."""
    problems = model_mismatch(learn.model, weights)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(problems))


_GROUP_KEYS_IGNORED = frozenset(("params", "initial_lr", "lr"))


def check_optimizer(learn: Any, path: str | os.PathLike, saved: dict[str, Any] | None) -> None:
    """Raise a `CheckpointError` when the optimizer state saved at `path` cannot go into
    `learn.opt`: another optimizer class (other hyper-parameters in its param groups, as SGD's
    `momentum` for Adam's `betas`), other param groups, or a hand-written optimizer that cannot
    take the state it would silently drop."""
    opt = learn.opt
    if saved is None:
        return
    name = type(opt).__name__
    if not hasattr(opt, "load_state_dict"):
        raise CheckpointError(f"checkpoint {path} holds an optimizer state, but this learner's optimizer ({name}) "
                              f"has no load_state_dict: resume with the optimizer class it was saved with")
    groups, own = saved.get("param_groups", []), getattr(opt, "param_groups", None)
    if own is None:
        return
    if len(groups) != len(own):
        raise CheckpointError(f"checkpoint {path} has an optimizer state with {len(groups)} param groups, this "
                              f"learner's {name} has {len(own)}")
    for saved_group, group in zip(groups, own):
        a, b = set(saved_group) - _GROUP_KEYS_IGNORED, set(group) - _GROUP_KEYS_IGNORED
        if a != b:
            raise CheckpointError(
                f"checkpoint {path} holds the state of another optimizer (its param groups have "
                f"{', '.join(sorted(a - b)) or 'fewer keys'}; this learner's {name} has "
                f"{', '.join(sorted(b - a)) or 'fewer keys'}): resume with the optimizer class it was saved with")
        if len(saved_group["params"]) != len(group["params"]):
            raise CheckpointError(f"checkpoint {path} has an optimizer state for {len(saved_group['params'])} "
                                  f"parameters in a group, this learner's {name} has {len(group['params'])}")


def set_grads(model: torch.nn.Module, grads: list[torch.Tensor | None]) -> None:
    """Set each parameter's `.grad` to a copy of `grads` (in `model.parameters()` order)."""
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.grad = None if g is None else g.to(p.device, p.dtype).clone()


def subscriber_states(subs: list[Any]) -> dict[str, Any]:
    """`{'<ClassName>#<k>': state}` for every subscriber with state (k counts earlier ones of its class)."""
    out, seen = {}, {}
    for sub in subs:
        name = type(sub).__qualname__
        k = seen.get(name, 0)
        seen[name] = k + 1
        state_dict = getattr(sub, "state_dict", None)
        out[f"{name}#{k}"] = state_dict() if callable(state_dict) else {}
    return out


def load_subscriber_states(subs: list[Any], states: dict[str, Any]) -> None:
    """Give each subscriber its state from `subscriber_states` (by class name and occurrence)."""
    seen: dict[str, int] = {}
    for sub in subs:
        name = type(sub).__qualname__
        key = f"{name}#{seen.get(name, 0)}"
        seen[name] = seen.get(name, 0) + 1
        if key in states and callable(getattr(sub, "load_state_dict", None)):
            try:
                sub.load_state_dict(states[key])
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                raise CheckpointError(f"the saved state of {key} does not fit this {name} ({type(exc).__name__}: "
                                      f"{exc}): was it saved by another version of it, or with other "
                                      f"arguments?") from exc


def learner_state(learn: Any, epoch: int, iter_: int | None, rng: dict | None = None, subs: dict | None = None,
                  epoch_rng: dict | None = None) -> dict[str, Any]:
    """The learner state of `LEARNER_KEYS` at position (`epoch`, `iter_`); `rng` and `subs`
    default to now."""
    return {
        "format": FORMAT,
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in learn.model.parameters()],
        "global_step": learn.global_step,
        "position": {"epoch": epoch, "iter": iter_},
        "rng": rng if rng is not None else rng_state(),
        "epoch_rng": None if iter_ is None else epoch_rng,
        "subs": subs if subs is not None else subscriber_states(learn.subs),
    }


def native_checkpoint(learn: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A native checkpoint: the model's and optimizer's state dicts plus the learner `state`."""
    opt = learn.opt
    return {"model": learn.model.state_dict(),
            "optimizer": opt.state_dict() if hasattr(opt, "state_dict") else None, **state}


WEIGHTS_FORMAT = "nntrain-weights-1"
"""The `format` entry of a file written by `save_weights` (`Learner.save`, `SaveBestS`)."""


def save_weights(learn: Any, path: str | os.PathLike, with_opt: bool = True, **extra: Any) -> Path:
    """Write `learn.model`'s state dict (and the optimizer's, with `with_opt`) to `path`
    atomically, with `extra` entries (a score, an epoch); returns the path."""
    opt = learn.opt
    state = {"format": WEIGHTS_FORMAT, "model": learn.model.state_dict(),
             "optimizer": opt.state_dict() if with_opt and hasattr(opt, "state_dict") else None, **extra}
    return save_checkpoint(state, path)


def load_weights(learn: Any, path: str | os.PathLike, with_opt: bool = True, strict: bool = True) -> dict[str, Any]:
    """Load a `save_weights` file (or a native checkpoint's weights) into `learn`: the model on
    its device, and the optimizer state when the file has one and `with_opt`; returns the file's dict.

    Raises:
        CheckpointError: missing or unreadable, no `"model"` entry, or weights for another model.
    """
    from nntrain.learner import model_device

    path = Path(path)
    try:
        state = torch.load(path, map_location=model_device(learn.model), weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no weights file at {path}") from None
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be loaded (corrupt or truncated?): {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        hint = " (a Lightning checkpoint: resume with fit(resume=...))" if isinstance(state, dict) and \
            "state_dict" in state else ""
        raise CheckpointError(f"{path} holds no model weights (no 'model' entry){hint}: write it with learn.save")
    if strict:
        check_model(learn, path, state["model"])
    learn.model.load_state_dict(state["model"], strict=strict)
    if with_opt and state.get("optimizer") is not None:
        if learn.opt is None:
            learn.create_opt()
        if hasattr(learn.opt, "load_state_dict"):
            learn.opt.load_state_dict(state["optimizer"])
    return state


@dataclass
class ResumePlan:
    """Where and how a fit continues from a checkpoint: the one pending resume of a fit, read
    from either format (`read`), held as `learn.resume_plan` for that fit only, and applied
    once: the engines call `apply_states` when the fit reaches the saved position.

    `lightning`: the file is a Lightning checkpoint (Lightning restores weights, optimizer, loops
    and a `ResumableDataLoader`'s position; the learner state comes from its `"nntrain"` entry).
    `epoch_offset`: the learner's epoch at the Trainer's epoch 0 (a native checkpoint continued
    under Lightning starts the Trainer at 0).
    """

    path: str
    epoch: int
    iter: int | None
    grads: list[Any]
    global_step: int
    rng: dict[str, Any]
    epoch_rng: dict[str, Any] | None
    subs: dict[str, Any]
    lightning: bool = False
    epoch_offset: int = 0
    applied: bool = False

    @property
    def inside_epoch(self) -> bool:
        """Saved inside a training pass (after batch `iter`)."""
        return self.iter is not None

    @property
    def start_epoch(self) -> int:
        """The epoch the fit continues with."""
        return self.epoch + (self.iter is None)

    @classmethod
    def read(cls, path: str | os.PathLike, state: dict[str, Any], rank: int = 0,
             world_size: int | None = None) -> "ResumePlan":
        """The plan for a loaded checkpoint of either format (`state`, read from `path`); given
        the `world_size` of the resuming fit, rank `rank`'s own subscriber states and RNG.

        Raises:
            ValueError: a checkpoint taken inside an epoch by another number of ranks.
        """
        lightning = is_lightning_checkpoint(state)
        entry = state[CHECKPOINT_ENTRY] if lightning else state
        pos = entry["position"]
        offset = pos["epoch"] - state.get("epoch", pos["epoch"]) if lightning else 0
        subs, rng = entry["subs"], entry["rng"]
        ranks = entry.get("ranks") or [{"subs": subs, "rng": rng}]
        if world_size is not None:
            if len(ranks) != world_size and pos["iter"] is not None:
                raise ValueError(
                    f"checkpoint {path} was taken inside epoch {pos['epoch']} (after training batch {pos['iter']}) "
                    f"by {len(ranks)} rank(s), and this fit runs {world_size}: each rank's partial epoch cannot "
                    f"be shared out again; resume with {len(ranks)} rank(s), or from a checkpoint at an epoch's end")
            if len(ranks) == world_size:
                subs, rng = ranks[rank]["subs"], ranks[rank]["rng"]
        return cls(path=str(path), epoch=pos["epoch"], iter=pos["iter"], grads=entry["grads"],
                   global_step=entry["global_step"], rng=rng, epoch_rng=entry["epoch_rng"],
                   subs=subs, lightning=lightning, epoch_offset=offset)

    def key(self) -> tuple[Any, ...]:
        """What identifies the checkpoint across machines: file name, position and step."""
        return (Path(self.path).name, self.epoch, self.iter, self.global_step)

    @classmethod
    def restore(cls, learn: Any, resume: str | os.PathLike, train: bool = True,
                lightning_ok: bool = False) -> "ResumePlan | None":
        """Find the checkpoint `resume` names (see `find_checkpoint`), check it against `learn`,
        and for a native one load model, optimizer, gradients and `global_step` into `learn`.
        Returns its plan, or None when `resume="last"` finds nothing.

        Raises:
            CheckpointError: unreadable, incomplete, or saved from a model with other keys/shapes.
            ValueError: a checkpoint from inside a training pass for a fit with `train=False`.
        """
        found = find_checkpoint(learn, resume)
        if found is None:
            return None
        path, state = found
        plan = cls.read(path, state)
        if plan.lightning and not lightning_ok:
            raise CheckpointError(f"{path} is a Lightning checkpoint: resume it with fit(..., engine='lightning', "
                                  f"resume=...), which hands it to the Trainer as ckpt_path")
        if plan.inside_epoch and not train:
            raise ValueError("a checkpoint taken inside a training pass cannot resume a fit with train=False")
        plan.check_fits(learn)
        if plan.lightning:
            prefix = "model."
            check_model(learn, path, {k[len(prefix):]: v for k, v in state["state_dict"].items()
                                      if k.startswith(prefix)})
            saved_opts = state.get("optimizer_states") or [None]
            check_optimizer(learn, path, saved_opts[0])
            return plan
        check_model(learn, path, state["model"])
        check_optimizer(learn, path, state["optimizer"])
        learn.model.load_state_dict(state["model"])
        if state["optimizer"] is not None:
            learn.opt.load_state_dict(state["optimizer"])
        set_grads(learn.model, plan.grads)
        learn.global_step = plan.global_step
        learn.epoch = plan.start_epoch
        return plan

    def describe(self) -> str:
        """Where the fit continues: "<path> (epoch e, after batch i | at its end, step s)"."""
        where = "at its end" if self.iter is None else f"after training batch {self.iter}"
        return f"{self.path} (epoch {self.epoch}, {where}, step {self.global_step})"

    def check_fits(self, learn: Any) -> None:
        """Refuse, before anything is loaded, a resume that cannot continue this fit: a checkpoint
        past the fit's last epoch, or a position past the training loader's end. A checkpoint at
        the end of the fit's last epoch is a finished run: a warning says so (nothing is trained).

        Raises:
            ValueError: naming the checkpoint's position and what does not fit.
        """
        n_epochs = learn.n_epochs
        if self.start_epoch > n_epochs:
            raise ValueError(f"checkpoint {self.describe()} is past this {n_epochs}-epoch fit: fit(epochs) counts all "
                             f"epochs, so continue it with fit({self.start_epoch + 1} or more, resume=...)")
        if self.start_epoch == n_epochs:
            warnings.warn(f"checkpoint {self.describe()} ends this {n_epochs}-epoch run: nothing left to train "
                          f"(ask for more epochs to go on)", RuntimeWarning, stacklevel=3)
        if self.inside_epoch:
            from nntrain.learner import loader_length

            n = loader_length(learn.dls.train)
            if n is not None and self.iter + 1 > n:
                raise ValueError(f"checkpoint {self.describe()} was taken after batch {self.iter}, but the training "
                                 f"loader has {n} batches per epoch (another batch size or dataset?): resume with "
                                 f"the loader it was saved with, or from a checkpoint at an epoch's end")

    def apply_states(self, learn: Any) -> None:
        """Give `learn`'s subscribers their saved states (by class name and occurrence) and
        restore the RNG as it was at the checkpoint; once."""
        if self.applied:
            return
        self.applied = True
        try:
            load_subscriber_states(learn.subs, self.subs)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {self.path}: {exc}") from exc.__cause__
        set_rng_state(self.rng)


def resumed_batches(learn: Any, plan: ResumePlan) -> Iterator[tuple[int, Any]]:
    """The resumed epoch's `(index, batch)` pairs after the saved position, in the original order.

    The epoch-start RNG is restored before the iterator is made (a shuffling sampler draws its
    seed from it), the batches already trained are fetched and discarded (no event fires), then
    the subscribers' states and the RNG at the checkpoint are restored.
    """
    set_rng_state(plan.epoch_rng)
    batches = iter(learn.dl)
    start = plan.iter + 1
    for _ in range(start):
        next(batches, None)
    plan.apply_states(learn)
    return enumerate(batches, start)
