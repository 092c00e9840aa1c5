"""What a checkpoint holds, in one place: the learner state captured at a position
(`capture`, `LEARNER_KEYS`), the two file layouts it is written in (a native `.pt`, and the
`"nntrain"` entry of a Lightning `.ckpt`), and the checked load with its format version. How a
fit continues from one is `nntrain.resume`'s `ResumePlan`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from nntrain.checkpoint import CheckpointError, ResumeRefused, list_checkpoints, read_checkpoint
from nntrain.events import declared
from nntrain.rng import rng_state

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
    "needed_keys",
    "capture",
    "native_checkpoint",
    "hyperparameters",
]

LEARNER_KEYS: tuple[str, ...] = ("format", "grads", "global_step", "position", "rng", "epoch_rng", "subs", "needed")
"""The learner state a checkpoint holds besides the weights and optimizer: the whole of a
Lightning checkpoint's `"nntrain"` entry, and with `"model"` and `"optimizer"` a native checkpoint.

- `format`: this layout's version (`FORMAT`).
- `grads`: each parameter's `.grad` (None or a tensor), in `model.parameters()` order.
- `global_step`: optimizer steps taken.
- `position`: `{"epoch": e, "iter": i, "finished": f}`, the last trained batch `i` of epoch `e`,
  or `i` None at the end of epoch `e` (after its training pass, and validation if any); `f`: a
  subscriber ended the run there (`learn.finished`, an early stop), so a resume trains nothing.
- `rng`: `rng_state()` at the save; `epoch_rng`: at the start of epoch `e`'s training pass
  (None at an epoch's end or where the loader keeps its own order, Lightning).
- `subs`: each subscriber's `state_dict()` by its `state_key` (see `state_keys`).
- `needed`: the keys of `subs` whose subscribers declare `needed_on_resume` (absent from files
  written before it existed: read as none).

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
            missing += [f"nntrain.{k}" for k in LEARNER_KEYS if k not in state[CHECKPOINT_ENTRY] and k != "needed"]
        if missing:
            raise CheckpointError(
                f"Lightning checkpoint {path} lacks nntrain's learner state (missing "
                f"{missing}): was it written while training an nntrain learner?"
            )
        _check_format(path, state[CHECKPOINT_ENTRY]["format"])
        return state
    missing = [k for k in REQUIRED_KEYS if k not in state and k != "needed"]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    _check_format(path, state["format"])
    return state


def _check_format(path: str | os.PathLike, version: Any) -> None:
    if version in _READS:
        return
    if isinstance(version, int) and version > FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {version}, written by a newer nntrain (this one reads "
            f"formats {', '.join(map(str, _READS))}): upgrade nntrain to resume it"
        )
    raise CheckpointError(
        f"checkpoint {path} has format {version!r}, which this nntrain cannot read (it reads "
        f"formats {', '.join(map(str, _READS))}): resume with the nntrain version that wrote it"
    )


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
        found = latest_checkpoint(dirs[0])
        files = list_checkpoints(dirs[0])
        if found is None and files:  # not a fresh start: this run's files, none of them usable
            raise CheckpointError(
                f'resume="last": none of the {len(files)} checkpoints in {dirs[0]} loads (newest '
                f"{files[-1].name}; the warnings above say why): resume from a path you trust, "
                f"or move them away to start afresh"
            )
        return found
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
    problems += [
        f"shape of {k}: model {tuple(own[k].shape)}, checkpoint {tuple(saved[k].shape)}"
        for k in own
        if k in saved and hasattr(saved[k], "shape") and own[k].shape != saved[k].shape
    ]
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
        raise CheckpointError(
            f"checkpoint {path} holds an optimizer state, but this learner's optimizer ({name}) "
            f"has no load_state_dict: resume with the optimizer class it was saved with"
        )
    groups, own = saved.get("param_groups", []), getattr(opt, "param_groups", None)
    if own is None:
        return
    if len(groups) != len(own):
        raise CheckpointError(
            f"checkpoint {path} has an optimizer state with {len(groups)} param groups, this "
            f"learner's {name} has {len(own)}"
        )
    for saved_group, group in zip(groups, own):
        a, b = set(saved_group) - _GROUP_KEYS_IGNORED, set(group) - _GROUP_KEYS_IGNORED
        if a != b:
            raise CheckpointError(
                f"checkpoint {path} holds the state of another optimizer (its param groups have "
                f"{', '.join(sorted(a - b)) or 'fewer keys'}; this learner's {name} has "
                f"{', '.join(sorted(b - a)) or 'fewer keys'}): resume with the optimizer class it was saved with"
            )
        if len(saved_group["params"]) != len(group["params"]):
            raise CheckpointError(
                f"checkpoint {path} has an optimizer state for {len(saved_group['params'])} "
                f"parameters in a group, this learner's {name} has {len(group['params'])}"
            )


def set_grads(model: torch.nn.Module, grads: list[torch.Tensor | None]) -> None:
    """Set each parameter's `.grad` to a copy of `grads` (in `model.parameters()` order)."""
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.grad = None if g is None else g.to(p.device, p.dtype).clone()


def state_keys(subs: list[Any]) -> list[str]:
    """Each subscriber's key in a checkpoint's `subs`: its `state_key` (default: its class name),
    with `#k` added to the k-th repeat of a key (the second `MetricsS` is `MetricsS#1`)."""
    keys: list[str] = []
    seen: dict[str, int] = {}
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


def needed_keys(subs: list[Any]) -> list[str]:
    """The `state_key`s of the subscribers that declare `needed_on_resume`."""
    return [key for key, sub in zip(state_keys(subs), subs) if declared(sub, "needed_on_resume")]


def load_subscriber_states(
    subs: list[Any], states: dict[str, Any], needed: list[str] | tuple[str, ...] = ()
) -> list[str]:
    """Give each subscriber its state from `subscriber_states` (by `state_key`); return the keys of
    saved states that no subscriber took (a non-empty state that is dropped is warned about).

    Raises:
        CheckpointError: a saved state does not fit its subscriber, or one of `needed` (saved by
            a subscriber whose absence changes the numbers) has no subscriber to take it.
    """
    keys = state_keys(subs)
    missing = [key for key in needed if key in states and key not in keys]
    if missing:
        raise CheckpointError(
            f"the run was saved with {', '.join(missing)}, and this fit has no such subscriber to continue "
            f"{'its' if len(missing) == 1 else 'their'} state (attached: {', '.join(keys) or 'none'}): without "
            f"it the resumed run trains differently. Attach it as it was saved (the same class, or the same "
            f"state_key), or start from the weights alone: learn.load(path) and fit without resume="
        )
    for key, sub in zip(keys, subs):
        if key not in states:
            continue
        try:
            declared(sub, "load_state_dict")(states[key])
        except ResumeRefused:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CheckpointError(
                f"the saved state of {key} does not fit this {type(sub).__qualname__} "
                f"({type(exc).__name__}: {exc}): was it saved by another version of it, or with "
                f"other arguments?"
            ) from exc
    dropped = [key for key, state in states.items() if key not in keys and state]
    if dropped:
        warnings.warn(
            f"the checkpoint holds the state of {', '.join(dropped)}, which no attached subscriber takes "
            f"(attached: {', '.join(keys) or 'none'}): that state is dropped",
            RuntimeWarning,
            stacklevel=4,
        )
    return dropped


def capture(
    learn: Any,
    epoch: int,
    iter_: int | None,
    rng: dict | None = None,
    subs: dict | None = None,
    epoch_rng: dict | None = None,
) -> dict[str, Any]:
    """The learner state of `LEARNER_KEYS` at position (`epoch`, `iter_`): the last trained batch
    `iter_` of `epoch`, or None at the epoch's end; `rng` and `subs` default to now."""
    return {
        "format": FORMAT,
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in learn.model.parameters()],
        "global_step": learn.global_step,
        "position": {"epoch": epoch, "iter": iter_, "finished": bool(learn.finished)},
        "rng": rng if rng is not None else rng_state(),
        "epoch_rng": None if iter_ is None else epoch_rng,
        "subs": subs if subs is not None else subscriber_states(learn.dispatch.subs),
        "needed": needed_keys(learn.dispatch.subs),
    }


def native_checkpoint(learn: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A native checkpoint: the model's and optimizer's state dicts plus the learner `state`, and
    how the run was made (`hyper_parameters`, as in Lightning's checkpoints)."""
    opt = learn.opt
    return {
        "model": learn.model.state_dict(),
        "optimizer": opt.state_dict() if hasattr(opt, "state_dict") else None,
        **state,
        "hyper_parameters": hyperparameters(learn),
    }


def hyperparameters(learn: Any, opt: Any = None) -> dict[str, Any]:
    """How a run was made, for both checkpoint formats (`hyper_parameters`, Lightning's key): lr,
    optimizer (`opt`, default `learn.opt`), batch size, epochs, model and loss, engine, and under
    `subs` each subscriber's constructor arguments it keeps as attributes, by `state_key`."""
    opt = learn.opt if opt is None else opt
    params: dict[str, Any] = {
        "lr": float(learn.lr),
        "optimizer": type(opt).__name__ if opt is not None else _plain(learn.optim_class),
        "epochs": int(learn.n_epochs),
        "model": type(learn.model).__name__,
        "loss_fn": _plain(learn.loss_fn),
        "engine": learn.engine.name,
    }
    batch_size = getattr(learn.dls.train, "batch_size", None)
    if isinstance(batch_size, int):
        params["batch_size"] = batch_size
    params["subs"] = {key: _settings(sub) for key, sub in zip(state_keys(learn.subs), learn.subs)}
    return params


def _settings(sub: Any) -> dict[str, Any]:
    """The arguments of `type(sub).__init__` that `sub` keeps under the same name."""
    import inspect

    try:
        names = list(inspect.signature(type(sub).__init__).parameters)[1:]
    except (TypeError, ValueError):
        return {}
    return {name: _plain(getattr(sub, name)) for name in names if hasattr(sub, name)}


def _plain(value: Any, depth: int = 0) -> Any:
    """`value` as plain data for a checkpoint: numbers, strings and None as they are, dtypes and
    paths as strings, containers element-wise, anything else by its name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, os.PathLike)):
        return str(value)
    if isinstance(value, slice):  # discriminative lrs, `lr=slice(lo, hi)`
        return {"slice": [_plain(value.start, depth + 1), _plain(value.stop, depth + 1)]}
    if isinstance(value, dict) and depth < 2:
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and depth < 2:
        return [_plain(v, depth + 1) for v in value]
    return getattr(value, "__name__", type(value).__name__)
