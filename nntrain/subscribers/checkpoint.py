"""`CheckpointS`: periodic, atomic checkpoints that let `fit(resume=...)` continue exactly."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from nntrain.checkpoint import checkpoint_name, learner_state, prune_checkpoints, rng_state, subscriber_states
from nntrain.learner import Subscriber

__all__ = ["CheckpointS", "NonFiniteWeightsError"]

class NonFiniteWeightsError(FloatingPointError):
    """The model's weights hold NaN or inf: no checkpoint is written over the last good one."""


class CheckpointS(Subscriber):
    """Saves everything a resumed fit needs to continue bit for bit, on either engine.

    A checkpoint holds the model, the optimizer state, the gradients (`MomentumLearner` keeps
    `mom * grad` between batches), `global_step`, the position (epoch, and the last trained batch
    or the epoch's end), every RNG state now and at the start of the epoch's training pass (the
    data order is drawn then), and each subscriber's `state_dict()` keyed by class name and
    occurrence (`MetricsS#0`).

    Save points: after every `every_batches`-th training batch (at `after_batch`, after
    `zero_grad`), and at the end of every `every_epochs`-th epoch (after its validation pass,
    or its training pass when there is none). A `KeyboardInterrupt` that lands outside a training
    batch (between batches, in a validation pass) also writes one, for the last training batch
    completed (in `cleanup_fit`); one that lands inside a training batch leaves the last
    checkpoint as it is (the batch's state is half-made), with a warning. Only the
    newest `keep` files are kept. (To make that interrupt checkpoint exact, every training batch
    that is not saved keeps a snapshot of the RNG and subscriber states, about 75 us on a laptop
    CPU; `save_on_interrupt=False` turns both off.)
    Weights holding NaN/inf are never written (`NonFiniteWeightsError`).

    Under Lightning the files are Lightning checkpoints (`ckpt-*.ckpt`, written by
    `trainer.save_checkpoint`, then made atomic the same way), which `fit(engine="lightning",
    resume=...)` hands to the Trainer as `ckpt_path`; the learner state Lightning does not keep
    goes in through `LearnerModule.on_save_checkpoint`. Two differences: a batch save that falls
    on an epoch's last training batch is written at that epoch's end instead (Lightning would
    resume it without the epoch's validation pass), and no interrupt checkpoint is written
    (Lightning handles Ctrl-C itself: cleanups run, then it exits with status 1).

    Args:
        dir: the directory for `ckpt-*.pt` files (made if missing).
        every_epochs: epochs between end-of-epoch checkpoints (None: none).
        every_batches: training batches between checkpoints (None: none), counted by `global_step`.
        keep: how many files to keep (oldest deleted first).
        save_on_interrupt: write a checkpoint when a KeyboardInterrupt stops the fit between batches.
    """

    order = 1000  # last: every other subscriber's after_batch/after_epoch has run when we save
    engines = ("native", "lightning")
    is_checkpointer = True  # find_checkpoint's resume="last" reads `dir`

    def __init__(self, dir: str | os.PathLike, every_epochs: int | None = 1, every_batches: int | None = None,
                 keep: int = 3, save_on_interrupt: bool = True) -> None:
        for name, value in (("every_epochs", every_epochs), ("every_batches", every_batches)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.dir = Path(dir)
        self.save_on_interrupt = save_on_interrupt
        self.every_epochs, self.every_batches, self.keep = every_epochs, every_batches, keep
        self.saved: list[Path] = []  # written by this subscriber, oldest first
        self._epoch_rng: dict[str, Any] | None = None
        # (epoch, iter, rng, subscriber states, epoch-start rng) after the last clean training batch:
        # valid until the next training batch starts (validation changes no training state)
        self._boundary: tuple | None = None
        self._saved_here = False  # the newest checkpoint is the current state
        self._save_at_epoch_end = False  # Lightning: a batch save moved to the epoch's end

    # ----- events --------------------------------------------------------------------------------

    def before_fit(self, learn: Any) -> None:
        """Nothing saved yet in this fit."""
        self._boundary, self._saved_here, self._save_at_epoch_end = None, False, False

    def before_epoch(self, learn: Any) -> None:
        """Capture the RNG state at the start of a training pass (the loader draws its order from it)."""
        if learn.model.training:
            self._epoch_rng = rng_state()

    def before_batch(self, learn: Any) -> None:
        """A training batch starts: the state is not clean until it ends."""
        if learn.model.training:
            self._boundary = None
            self._saved_here = False

    def after_batch(self, learn: Any) -> None:
        """Save every `every_batches` training batches; remember the clean point for an interrupt."""
        if not learn.model.training:
            return
        engine = learn.engine
        if self.every_batches is not None and learn.global_step % self.every_batches == 0:
            last = hasattr(learn.dl, "__len__") and learn.iter + 1 >= len(learn.dl)
            if last and not engine.resumes_after_last_batch:
                self._save_at_epoch_end = True
            else:
                self.save(learn, learn.iter)
        elif self.save_on_interrupt and engine.saves_on_interrupt:
            # what an interrupt before the next batch saves: taken now, because the cleanups that
            # run before cleanup_fit (MetricsS drops its buffer) change subscriber state
            self._boundary = (learn.epoch, learn.iter, rng_state(), subscriber_states(learn.subs),
                              self._epoch_rng)

    def after_epoch(self, learn: Any) -> None:
        """Save at the end of every `every_epochs`-th epoch (after validation, if any)."""
        ends_epoch = not learn.model.training or not learn.fit_valid
        if not ends_epoch:
            return
        if self._save_at_epoch_end or (self.every_epochs is not None and (learn.epoch + 1) % self.every_epochs == 0):
            self._save_at_epoch_end = False
            self.save(learn, None)

    def cleanup_fit(self, learn: Any) -> None:
        """On a KeyboardInterrupt outside a training batch, save the last training batch completed
        (then the interrupt propagates)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, KeyboardInterrupt) and self.save_on_interrupt and learn.engine.saves_on_interrupt:
            if self._boundary is not None:
                epoch, iter_, rng, subs, epoch_rng = self._boundary
                self.save(learn, iter_, epoch=epoch, rng=rng, subs=subs, epoch_rng=epoch_rng)
            elif not self._saved_here:
                newest = self.saved[-1] if self.saved else "none from this fit"
                warnings.warn(f"interrupted inside a training batch (or before the first): no checkpoint "
                              f"written; the newest is {newest}",
                              RuntimeWarning, stacklevel=2)

    # ----- saving --------------------------------------------------------------------------------

    def save(self, learn: Any, iter_: int | None, epoch: int | None = None, rng: dict | None = None,
             subs: dict | None = None, epoch_rng: dict | None = None) -> Path:
        """Write a checkpoint for the position (`learn.epoch`, last trained batch `iter_`, or the
        epoch's end when None) and prune to `keep` files.

        Raises:
            NonFiniteWeightsError: a weight is NaN or inf (nothing is written).
        """
        epoch = learn.epoch if epoch is None else epoch
        params = [p.detach() for p in learn.model.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise NonFiniteWeightsError(
                f"the weights hold NaN or inf at epoch {epoch}, step {learn.global_step}: no checkpoint "
                f"written; the last good one is {self.saved[-1] if self.saved else 'none from this fit'}")
        self._boundary, self._saved_here = None, True
        state = learner_state(learn, epoch, iter_, rng, subs, epoch_rng if epoch_rng is not None else self._epoch_rng)
        stem = self.dir / checkpoint_name(learn.global_step, epoch, iter_, suffix="")
        path = Path(learn.engine.save_checkpoint(stem, state, learn))
        self.saved = [p for p in self.saved if p != path] + [path]
        if learn.engine.rank == 0:
            for gone in prune_checkpoints(self.dir, self.keep):
                if gone in self.saved:
                    self.saved.remove(gone)
        return path

    def state_dict(self) -> dict[str, Any]:
        """The epoch-start RNG state, so checkpoints later in a resumed epoch can still reproduce it."""
        return {"epoch_rng": self._epoch_rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`."""
        self._epoch_rng = state["epoch_rng"]

