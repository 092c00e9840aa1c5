"""`ResumePlan`: where and how a fit continues from a checkpoint of either format, and
`resumed_batches`, the native loop's way back to the saved position inside an epoch."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nntrain.checkpoint import CheckpointError
from nntrain.checkpoint_state import (
    CHECKPOINT_ENTRY,
    _upgrade_keys,
    check_model,
    check_optimizer,
    find_checkpoint,
    is_lightning_checkpoint,
    load_subscriber_states,
    set_grads,
)
from nntrain.checks import loader_length
from nntrain.rng import set_rng_state

__all__ = ["ResumePlan", "resumed_batches"]


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
    `finished`: a subscriber ended the run at this checkpoint (an early stop): a resume from it
    trains nothing (`check_fits` warns).
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
    finished: bool = False
    needed: tuple[str, ...] = ()

    @property
    def inside_epoch(self) -> bool:
        """Saved inside a training pass (after batch `iter`)."""
        return self.iter is not None

    @property
    def start_epoch(self) -> int:
        """The epoch the fit continues with."""
        return self.epoch + (self.iter is None)

    @classmethod
    def read(
        cls, path: str | os.PathLike, state: dict[str, Any], rank: int = 0, world_size: int | None = None
    ) -> ResumePlan:
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
                    f"be shared out again; resume with {len(ranks)} rank(s), or from a checkpoint at an epoch's end"
                )
            if len(ranks) == world_size:
                subs, rng = ranks[rank]["subs"], ranks[rank]["rng"]
        return cls(
            path=str(path),
            epoch=pos["epoch"],
            iter=pos["iter"],
            grads=entry["grads"],
            global_step=entry["global_step"],
            rng=rng,
            epoch_rng=entry["epoch_rng"],
            subs=subs,
            lightning=lightning,
            epoch_offset=offset,
            finished=bool(pos.get("finished")),
            needed=tuple(entry.get("needed") or ()),
        )

    def key(self) -> tuple[Any, ...]:
        """What identifies the checkpoint across machines: file name, position and step."""
        return (Path(self.path).name, self.epoch, self.iter, self.global_step)

    @classmethod
    def restore(
        cls, learn: Any, resume: str | os.PathLike, n_epochs: int, train: bool = True, lightning_ok: bool = False
    ) -> ResumePlan | None:
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
            raise CheckpointError(
                f"{path} is a Lightning checkpoint: resume it with fit(..., engine='lightning', "
                f"resume=...), which hands it to the Trainer as ckpt_path"
            )
        if plan.inside_epoch and not train:
            raise ValueError("a checkpoint taken inside a training pass cannot resume a fit with train=False")
        plan.check_fits(learn, n_epochs)
        if plan.lightning:
            prefix = "model."
            weights = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
            check_model(learn, path, weights)
            saved_opts = state.get("optimizer_states") or [None]
            check_optimizer(learn, path, saved_opts[0])
            if plan.finished:  # no Trainer runs: the learner takes the run's last state itself
                learn.model.load_state_dict(weights)
                if saved_opts[0] is not None:
                    learn.opt.load_state_dict(saved_opts[0])
                learn.global_step = plan.global_step
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
        the end of the fit's last epoch, or one a subscriber marked `finished`, is a finished run:
        a warning says so (nothing is trained).

        Raises:
            ValueError: naming the checkpoint's position and what does not fit.
        """
        if self.finished:
            warnings.warn(
                f"checkpoint {self.describe()} ends a finished run (a subscriber stopped it early): "
                f"nothing left to train. To train on from its weights on purpose, learn.load(path) "
                f"and fit without resume=",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        if self.start_epoch > n_epochs:
            raise ValueError(
                f"checkpoint {self.describe()} is past this {n_epochs}-epoch fit: fit(epochs) counts all "
                f"epochs, so continue it with fit({self.start_epoch + 1} or more, resume=...)"
            )
        if self.start_epoch == n_epochs:
            warnings.warn(
                f"checkpoint {self.describe()} ends this {n_epochs}-epoch run: nothing left to train "
                f"(ask for more epochs to go on)",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.iter is not None:  # inside_epoch, spelled so that type checkers see an int below
            n = loader_length(learn.dls.train)
            if n is not None and self.iter + 1 > n:
                raise ValueError(
                    f"checkpoint {self.describe()} was taken after batch {self.iter}, but the training "
                    f"loader has {n} batches per epoch (another batch size or dataset?): resume with "
                    f"the loader it was saved with, or from a checkpoint at an epoch's end"
                )

    def apply_states(self, learn: Any) -> None:
        """Give `learn`'s subscribers their saved states (by `state_key`) and restore the RNG as it
        was at the checkpoint (the `Dispatcher` calls this once per resumed fit)."""
        try:
            load_subscriber_states(learn.dispatch.subs, self.subs, self.needed)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {self.path}: {exc}") from exc.__cause__
        set_rng_state(self.rng)


def resumed_batches(dl: Any, plan: ResumePlan) -> Iterator[tuple[int, Any]]:
    """The resumed epoch's `(index, batch)` pairs after the saved position, in the original order.

    The epoch-start RNG is restored before the iterator is made (a shuffling sampler draws its
    seed from it) and the batches already trained are fetched and discarded (no event fires);
    the `Dispatcher` then applies the saved states before the first batch it yields.
    """
    set_rng_state(plan.epoch_rng)  # type: ignore[arg-type]  # a plan from inside an epoch has both
    batches = iter(dl)
    start = plan.iter + 1  # type: ignore[operator]
    for _ in range(start):
        next(batches, None)
    return enumerate(batches, start)
