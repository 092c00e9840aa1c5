"""What a checkpoint holds, in one place: the learner state captured at a position
(`capture`, `LEARNER_KEYS`), the two file layouts it is written in (a native `.pt`, and the
`"nntrain"` entry of a Lightning `.ckpt`), the checked load with its format version, and the
`ResumePlan` a fit continues from.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nntrain.checkpoint import CheckpointError, list_checkpoints, read_checkpoint
from nntrain.checks import loader_length
from nntrain.events import declared
from nntrain.rng import rng_state, set_rng_state

__all__ = [
    "LEARNER_KEYS",
    "FORMAT",
    "REQUIRED_KEYS",
    "CHECKPOINT_ENTRY",
    "is_lightning_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "find_checkpoint",
    "model_mismatch",
    "check_model",
    "check_optimizer",
    "set_grads",
    "state_keys",
    "subscriber_states",
    "load_subscriber_states",
    "capture",
    "native_checkpoint",
    "ResumePlan",
    "resumed_batches",
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
- `subs`: each subscriber's `state_dict()` by its `state_key` (see `state_keys`).

A Lightning checkpoint of several DDP ranks also holds `ranks`: each rank's `{"subs", "rng"}`
(rank r's at index r; the entries above are rank 0's), so a resume inside an epoch gives
every rank its own partial-epoch state.
"""

FORMAT = 3
"""This layout's version. 3: subscriber states keyed by `state_key`; 2 (read too): keyed
`"<ClassName>#<k>"`. A file of a newer version is refused with a message."""

_READS = (2, 3)

REQUIRED_KEYS: tuple[str, ...] = ("model", "optimizer", *LEARNER_KEYS)
"""Keys every native checkpoint holds; a file missing one is reported as corrupt."""

CHECKPOINT_ENTRY = "nntrain"
"""The entry of a Lightning checkpoint that holds the learner state (`LEARNER_KEYS`)."""

LIGHTNING_KEYS: tuple[str, ...] = ("state_dict", CHECKPOINT_ENTRY)
"""Keys a Lightning checkpoint written through the bridge holds (see `is_lightning_checkpoint`)."""


def is_lightning_checkpoint(state: dict[str, Any]) -> bool:
    """Whether `state` (a loaded checkpoint) is a Lightning checkpoint rather than a native one."""
    return "pytorch-lightning_version" in state or "state_dict" in state

def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint: a native one, or a Lightning one written while training a
    `LearnerModule` (tensors and plain values only: `weights_only=True`).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, lacks a required key, or is
            of a format version this nntrain does not read.
    """
    state = read_checkpoint(path, map_location)
    if is_lightning_checkpoint(state):
        missing = [k for k in LIGHTNING_KEYS if k not in state]
        if CHECKPOINT_ENTRY in state:
            missing += [f"nntrain.{k}" for k in LEARNER_KEYS if k not in state[CHECKPOINT_ENTRY]]
        if missing:
            raise CheckpointError(f"Lightning checkpoint {path} lacks nntrain's learner state (missing "
                                  f"{missing}): was it written while training an nntrain learner?")
        _check_format(path, state[CHECKPOINT_ENTRY]["format"])
        return state
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    _check_format(path, state["format"])
    return state


def _check_format(path: str | os.PathLike, version: Any) -> None:
    if version in _READS:
        return
    if isinstance(version, int) and version > FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {version}, written by a newer nntrain (this one reads "
                              f"formats {', '.join(map(str, _READS))}): upgrade nntrain to resume it")
    raise CheckpointError(f"checkpoint {path} has format {version!r}, which this nntrain cannot read (it reads "
                          f"formats {', '.join(map(str, _READS))}): resume with the nntrain version that wrote it")


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


def find_checkpoint(learn: Any, resume: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `resume` names, loaded and checked, as `(path, state)`.

    Args:
        learn: the learner (a subscriber's `checkpoint_dir` gives the directory for "last").
        resume: a file, a directory (its newest loadable file), or "last" (the newest in the
            `checkpoint_dir` of the first attached subscriber that has one: `CheckpointS`).

    Returns:
        None when `resume="last"` finds no checkpoint.

    Raises:
        CheckpointError: unreadable or incomplete, or no loadable file in a named directory.
        ValueError: `resume="last"` without a subscriber that writes checkpoints (`CheckpointS`).
    """
    if resume == "last":
        dirs = [d for d in (declared(sub, "checkpoint_dir") for sub in learn.subs) if d is not None]
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

def model_mismatch(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between `model`'s state dict and `saved` (empty when they match)."""
    own = model.state_dict()
    problems = [f"missing in checkpoint: {k}" for k in own if k not in saved]
    problems += [f"not in model: {k}" for k in saved if k not in own]
    problems += [f"shape of {k}: model {tuple(own[k].shape)}, checkpoint {tuple(saved[k].shape)}"
                 for k in own if k in saved and hasattr(saved[k], "shape") and own[k].shape != saved[k].shape]
    return problems

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

def state_keys(subs: list[Any]) -> list[str]:
    """Each subscriber's key in a checkpoint's `subs`: its `state_key` (default: its class name),
    with `#k` added to the k-th repeat of a key (the second `MetricsS` is `MetricsS#1`)."""
    keys, seen = [], {}
    for sub in subs:
        key = declared(sub, "state_key") or type(sub).__qualname__
        k = seen.get(key, 0)
        seen[key] = k + 1
        keys.append(key if k == 0 else f"{key}#{k}")
    return keys


def subscriber_states(subs: list[Any]) -> dict[str, Any]:
    """`{state_key: state}` for every subscriber (see `state_keys`)."""
    return {key: declared(sub, "state_dict")() for key, sub in zip(state_keys(subs), subs)}


def _upgrade_keys(states: dict[str, Any]) -> dict[str, Any]:
    """Format 2's `"<ClassName>#<k>"` keys as format 3's (`#0` dropped)."""
    return {(key[:-2] if key.endswith("#0") else key): state for key, state in states.items()}


def load_subscriber_states(subs: list[Any], states: dict[str, Any]) -> list[str]:
    """Give each subscriber its state from `subscriber_states` (by `state_key`); return the keys of
    saved states that no subscriber took (a non-empty state that is dropped is warned about).

    Raises:
        CheckpointError: a saved state does not fit its subscriber.
    """
    keys = state_keys(subs)
    for key, sub in zip(keys, subs):
        if key not in states:
            continue
        try:
            declared(sub, "load_state_dict")(states[key])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"the saved state of {key} does not fit this {type(sub).__qualname__} "
                                  f"({type(exc).__name__}: {exc}): was it saved by another version of it, or with "
                                  f"other arguments?") from exc
    dropped = [key for key, state in states.items() if key not in keys and state]
    if dropped:
        warnings.warn(f"the checkpoint holds the state of {', '.join(dropped)}, which no attached subscriber takes "
                      f"(attached: {', '.join(keys) or 'none'}): that state is dropped", RuntimeWarning, stacklevel=4)
    return dropped


def capture(learn: Any, epoch: int, iter_: int | None, rng: dict | None = None, subs: dict | None = None,
            epoch_rng: dict | None = None) -> dict[str, Any]:
    """The learner state of `LEARNER_KEYS` at position (`epoch`, `iter_`): the last trained batch
    `iter_` of `epoch`, or None at the epoch's end; `rng` and `subs` default to now."""
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


@dataclass
class ResumePlan:
    """Where and how a fit continues from a checkpoint, read from either format (`read`), held
    as `learn.resume_plan` for that fit only. `restore` loads what goes in before the fit starts
    (weights, optimizer, gradients, `global_step`); the saved subscriber states and RNG
    (`apply_states`) go in at one of the two points the `nntrain.dispatch.Dispatcher` keeps for
    both engines: after `before_fit` (a checkpoint at an epoch's end), or just before the first
    training batch past the saved position.

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
        if entry["format"] == 2:
            subs, ranks = _upgrade_keys(subs), [{**r, "subs": _upgrade_keys(r["subs"])} for r in ranks]
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
    def restore(cls, learn: Any, resume: str | os.PathLike, n_epochs: int, train: bool = True,
                lightning_ok: bool = False) -> "ResumePlan | None":
        """Find the checkpoint `resume` names (see `find_checkpoint`), check it against `learn`
        and a fit of `n_epochs` epochs, and for a native one load model, optimizer, gradients and
        `global_step` into `learn`. Returns its plan, or None when `resume="last"` finds nothing.

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
        plan.check_fits(learn, n_epochs)
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
        return plan

    def describe(self) -> str:
        """Where the fit continues: "<path> (epoch e, after batch i | at its end, step s)"."""
        where = "at its end" if self.iter is None else f"after training batch {self.iter}"
        return f"{self.path} (epoch {self.epoch}, {where}, step {self.global_step})"

    def check_fits(self, learn: Any, n_epochs: int) -> None:
        """Refuse, before anything is loaded, a resume that cannot continue this fit: a checkpoint
        past the fit's last epoch, or a position past the training loader's end. A checkpoint at
        the end of the fit's last epoch is a finished run: a warning says so (nothing is trained).

        Raises:
            ValueError: naming the checkpoint's position and what does not fit.
        """
        if self.start_epoch > n_epochs:
            raise ValueError(f"checkpoint {self.describe()} is past this {n_epochs}-epoch fit: fit(epochs) counts all "
                             f"epochs, so continue it with fit({self.start_epoch + 1} or more, resume=...)")
        if self.start_epoch == n_epochs:
            warnings.warn(f"checkpoint {self.describe()} ends this {n_epochs}-epoch run: nothing left to train "
                          f"(ask for more epochs to go on)", RuntimeWarning, stacklevel=3)
        if self.inside_epoch:
            n = loader_length(learn.dls.train)
            if n is not None and self.iter + 1 > n:
                raise ValueError(f"checkpoint {self.describe()} was taken after batch {self.iter}, but the training "
                                 f"loader has {n} batches per epoch (another batch size or dataset?): resume with "
                                 f"the loader it was saved with, or from a checkpoint at an epoch's end")

    def apply_states(self, learn: Any) -> None:
        """Give `learn`'s subscribers their saved states (by `state_key`) and restore the RNG as it
        was at the checkpoint (the `Dispatcher` calls this once per resumed fit)."""
        try:
            load_subscriber_states(learn.subs, self.subs)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {self.path}: {exc}") from exc.__cause__
        set_rng_state(self.rng)


def resumed_batches(dl: Any, plan: ResumePlan) -> Iterator[tuple[int, Any]]:
    """The resumed epoch's `(index, batch)` pairs after the saved position, in the original order.

    The epoch-start RNG is restored before the iterator is made (a shuffling sampler draws its
    seed from it) and the batches already trained are fetched and discarded (no event fires);
    the `Dispatcher` then applies the saved states before the first batch it yields.
    """
    set_rng_state(plan.epoch_rng)
    batches = iter(dl)
    start = plan.iter + 1
    for _ in range(start):
        next(batches, None)
    return enumerate(batches, start)
