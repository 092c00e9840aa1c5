"""`CheckpointS`: periodic, atomic checkpoints that let `fit(resume=...)` continue exactly."""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from nntrain.checkpoint import (
    DirectoryLock,
    checkpoint_name,
    list_checkpoints,
    remove_stale_temporaries,
    sigint_deferred,
)
from nntrain.checkpoint_state import capture, subscriber_states
from nntrain.events import Subscriber
from nntrain.rng import rng_state

__all__ = ["CheckpointS", "NonFiniteWeightsError"]


class NonFiniteWeightsError(FloatingPointError):
    """The model's weights hold NaN or inf: no checkpoint is written over the last good one."""


class CheckpointS(Subscriber):
    """Saves everything a resumed fit needs to continue bit for bit, on either engine.

    A checkpoint holds the model, the optimizer state, the gradients (`MomentumLearner` keeps
    `mom * grad` between batches), `global_step`, the position (epoch, and the last trained batch
    or the epoch's end), every RNG state now and at the start of the epoch's training pass (the
    data order is drawn then), and each subscriber's `state_dict()` keyed by its `state_key`
    (default: the class name, numbered when repeated: `MetricsS`, `MetricsS#1`).

    Save points: after every `every_batches`-th optimizer step (at `after_batch`, after
    `zero_grad`; a batch that took no step, under `GradAccumS` or a skipped fp16 step, saves
    nothing), and at the end of every `every_epochs`-th epoch (after its validation pass,
    or its training pass when there is none). Only the newest `keep` files of this run are kept
    (files it did not write, loadable or not, are never deleted).

    Ctrl-C: natively, in the main thread, a Ctrl-C is held until the next clean point (the end of
    the running training batch, or of a validation batch), where the state is saved exactly (in a
    validation pass: the last training batch's), then raised; a second Ctrl-C interrupts at
    once. So only one snapshot per training pass is taken (its last batch's, for an interrupt
    during validation). Where Ctrl-C cannot be held (another thread or SIGINT handler), or for a
    `KeyboardInterrupt` raised by code, the interrupt is handled in `cleanup_fit`: outside a
    training batch it writes the last training batch completed (each training batch not saved
    then keeps a snapshot of the RNG and subscriber states, about 75 us); inside one it leaves
    the last checkpoint as it is, with a warning. One landing during a write is held until the
    file is complete. `save_on_interrupt=False` turns all of it off.

    One run per directory: at `before_fit` the directory is made and checked writable, a lock
    (`DirectoryLock`) keeps a second writer out, temporary files a killed writer left are
    removed, and a fresh fit into a directory that holds checkpoints of another run is refused
    (resume it with `fit(resume="last")`, or use another directory).
    Weights or buffers (BatchNorm statistics) holding NaN/inf are never written
    (`NonFiniteWeightsError`).

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
        every_batches: optimizer steps between checkpoints (None: none), counted by `global_step`
            (training batches, without accumulation).
        keep: how many of this run's files to keep (oldest deleted first).
        save_on_interrupt: write a checkpoint when a KeyboardInterrupt stops the fit between batches.
    """

    order = 1000  # last: every other subscriber's after_batch/after_epoch has run when we save
    one_rank_cancels = False  # never cancels
    engines = ("native", "lightning")

    def __init__(
        self,
        dir: str | os.PathLike,
        every_epochs: int | None = 1,
        every_batches: int | None = None,
        keep: int = 3,
        save_on_interrupt: bool = True,
    ) -> None:
        for name, value in (("every_epochs", every_epochs), ("every_batches", every_batches)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        if not isinstance(dir, (str, os.PathLike)) or str(dir) == "":
            raise TypeError(f"CheckpointS needs a directory to write to (a str or path), got {dir!r}")
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
        self._steps_before = 0  # global_step when the training batch started
        self._lock: DirectoryLock | None = None
        self._interrupt = False  # a Ctrl-C arrived and waits for the next clean point
        self._defers = False  # this fit holds Ctrl-C until a clean point (see _defer_ctrl_c)

    @property
    def checkpoint_dir(self) -> Path:  # type: ignore[override]  # read-only here (Subscriber's is a default)
        """Where it writes: `fit(resume="last")` resumes from the newest file here."""
        return self.dir

    # ----- events --------------------------------------------------------------------------------

    def before_fit(self, learn: Any) -> None:
        """Check the directory and take it for this run (see the class doc); nothing saved yet in this fit.

        Raises:
            ValueError: the directory cannot be made or written, or holds another run's checkpoints.
            RuntimeError: another writer holds the directory's lock.
        """
        self._boundary, self._saved_here, self._save_at_epoch_end = None, False, False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"CheckpointS cannot use {self.dir}: {exc.strerror or exc} (a file in the way, or no "
                f"permission): give it a directory it can create"
            ) from None
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise ValueError(f"CheckpointS cannot write in {self.dir} (no permission): give it a writable directory")
        if learn.engine.rank != 0:
            return
        self._lock = self._lock or DirectoryLock(self.dir)
        self._lock.acquire()
        try:
            remove_stale_temporaries(self.dir)
            self._adopt_run(learn)
        except BaseException:
            self._release()
            raise
        self._defer_ctrl_c(learn)

    def _defer_ctrl_c(self, learn: Any) -> None:
        """Hold a Ctrl-C until the next clean point (the end of a training batch, the end of a
        validation batch or pass), where the state is saved exactly and the interrupt raised: no
        per-batch snapshot needed. A second Ctrl-C interrupts at once. Only in the main thread,
        where Python's own handler is in place, on an engine that leaves Ctrl-C to us."""
        self._interrupt = self._defers = False
        if not (self.save_on_interrupt and learn.engine.saves_on_interrupt):
            return
        if (
            threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            return

        def hold(signum: int, frame: Any) -> None:
            self._interrupt = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one raises at once

        signal.signal(signal.SIGINT, hold)
        self._defers = True

    def _stop_for_interrupt(self, learn: Any, now: bool, iter_: int | None = None) -> None:
        """A held Ctrl-C: save the clean state (`now`, at position `iter_`; else the last
        training batch's) unless it is saved already, and raise the interrupt."""
        self._interrupt = False
        try:
            if now and not self._saved_here:
                self.save(learn, iter_)
            elif not now and self._boundary is not None:
                epoch, at, rng, subs, epoch_rng = self._boundary
                self.save(learn, at, epoch=epoch, rng=rng, subs=subs, epoch_rng=epoch_rng)
        except Exception as err:  # the interrupt goes on; the failed save is reported, not raised
            self._boundary, self._saved_here = None, True  # said here: nothing more to try or warn about
            warnings.warn(
                f"interrupted: the interrupt checkpoint could not be written ({err}); the newest is "
                f"{self.saved[-1] if self.saved else 'none from this fit'}",
                RuntimeWarning,
                stacklevel=3,
            )
        raise KeyboardInterrupt

    def _undefer_ctrl_c(self) -> None:
        if self._defers:
            self._defers = False
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def _adopt_run(self, learn: Any) -> None:
        """Refuse another run's files; when resuming from this directory, its files up to the
        resumed one are this run's (pruned as ours)."""
        files = list_checkpoints(self.dir)
        plan = learn.resume_plan
        source = Path(plan.path) if plan is not None and getattr(plan, "path", None) else None
        if source is not None and source.parent.resolve() == self.dir.resolve():
            self.saved = [f for f in files if f.name <= source.name]
            return
        foreign = [f for f in files if f not in self.saved]
        if foreign:
            raise ValueError(
                f"{self.dir} holds checkpoints of another run ({len(foreign)} files, newest {foreign[-1].name}): "
                f"continue that run with fit(..., resume='last'), give CheckpointS an empty directory, or "
                f"delete those files"
            )

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def before_epoch(self, learn: Any) -> None:
        """Capture the RNG state at the start of a training pass (the loader draws its order from it)."""
        if learn.model.training:
            self._epoch_rng = rng_state()

    def before_batch(self, learn: Any) -> None:
        """A training batch starts: the state is not clean until it ends."""
        if learn.model.training:
            self._boundary = None
            self._saved_here = False
            self._steps_before = learn.global_step

    def after_batch(self, learn: Any) -> None:
        """Save every `every_batches` optimizer steps; remember the clean point for an interrupt;
        stop for a held Ctrl-C."""
        if not learn.model.training:
            if self._interrupt:
                self._stop_for_interrupt(learn, now=False)
            return
        engine = learn.engine
        stepped = learn.global_step != self._steps_before
        if self.every_batches is not None and stepped and learn.global_step % self.every_batches == 0:
            last = learn.n_batches is not None and learn.iter + 1 >= learn.n_batches
            if last and not engine.resumes_after_last_batch:
                self._save_at_epoch_end = True
            else:
                self.save(learn, learn.iter)
        elif (
            self.save_on_interrupt
            and engine.saves_on_interrupt
            and (not self._defers or learn.n_batches is None or learn.iter + 1 >= learn.n_batches)
        ):
            # what an interrupt before the next batch saves: taken now, because the cleanups that
            # run before cleanup_fit (MetricsS drops its buffer) change subscriber state. A held
            # Ctrl-C needs it only for the pass's last batch (an interrupt during validation).
            self._boundary = (
                learn.epoch,
                learn.iter,
                rng_state(),
                subscriber_states(learn.dispatch.subs),
                self._epoch_rng,
            )
        if self._interrupt:
            self._stop_for_interrupt(learn, now=True, iter_=learn.iter)

    def after_epoch(self, learn: Any) -> None:
        """Save at the end of every `every_epochs`-th epoch (after validation, if any)."""
        ends_epoch = not learn.model.training or not learn.fit_valid
        if not ends_epoch:
            if self._interrupt:
                self._stop_for_interrupt(learn, now=False)
            return
        if self._save_at_epoch_end or (self.every_epochs is not None and (learn.epoch + 1) % self.every_epochs == 0):
            self._save_at_epoch_end = False
            self.save(learn, None)
        if self._interrupt:
            self._stop_for_interrupt(learn, now=True, iter_=None)

    def cleanup_fit(self, learn: Any) -> None:
        """On a KeyboardInterrupt outside a training batch, save the last training batch completed
        (then the interrupt propagates)."""
        try:
            self._save_on_interrupt(learn, sys.exc_info()[1])
        finally:
            self._undefer_ctrl_c()
            self._release()
        if self._interrupt:  # held past the last clean point: the fit ended, the interrupt still counts
            self._interrupt = False
            raise KeyboardInterrupt

    def _save_on_interrupt(self, learn: Any, exc: BaseException | None) -> None:
        if isinstance(exc, KeyboardInterrupt) and self.save_on_interrupt and learn.engine.saves_on_interrupt:
            if self._boundary is not None:
                epoch, iter_, rng, subs, epoch_rng = self._boundary
                try:
                    self.save(learn, iter_, epoch=epoch, rng=rng, subs=subs, epoch_rng=epoch_rng)
                except Exception as err:  # the interrupt goes on; the failed save is reported, not raised
                    warnings.warn(
                        f"interrupted: the interrupt checkpoint could not be written ({err}); the newest "
                        f"is {self.saved[-1] if self.saved else 'none from this fit'}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            elif not self._saved_here:
                plan = learn.resume_plan
                if plan is not None and learn.global_step == plan.global_step:  # nothing trained since
                    warnings.warn(
                        f"interrupted before this fit trained a batch: the checkpoint it resumed from "
                        f"holds the current state ({plan.path}); resume from it again",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    return
                newest = self.saved[-1] if self.saved else "none from this fit"
                warnings.warn(
                    f"interrupted inside a training batch (or before the first): no checkpoint "
                    f"written; the newest is {newest}",
                    RuntimeWarning,
                    stacklevel=2,
                )

    # ----- saving --------------------------------------------------------------------------------

    def save(
        self,
        learn: Any,
        iter_: int | None,
        epoch: int | None = None,
        rng: dict | None = None,
        subs: dict | None = None,
        epoch_rng: dict | None = None,
    ) -> Path:
        """Write a checkpoint for the position (`learn.epoch`, last trained batch `iter_`, or the
        epoch's end when None) and prune to `keep` files.

        Raises:
            NonFiniteWeightsError: a weight is NaN or inf (nothing is written).
        """
        epoch = learn.epoch if epoch is None else epoch
        tensors = [t for t in learn.model.state_dict().values() if t.is_floating_point()]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            bad = [
                k
                for k, t in learn.model.state_dict().items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())
            ]
            raise NonFiniteWeightsError(
                f"the weights hold NaN or inf at epoch {epoch}, step {learn.global_step} (in {', '.join(bad[:5])}): "
                f"no checkpoint written; the last good one is "
                f"{self.saved[-1] if self.saved else 'none from this fit'}"
            )
        state = capture(learn, epoch, iter_, rng, subs, epoch_rng if epoch_rng is not None else self._epoch_rng)
        stem = self.dir / checkpoint_name(learn.global_step, epoch, iter_, suffix="")
        with sigint_deferred():  # a Ctrl-C now lands after the file is in place and recorded
            path = Path(learn.engine.save_checkpoint(stem, state, learn))
            self._boundary, self._saved_here = None, True  # only once the file is in place
            self.saved = [p for p in self.saved if p != path] + [path]
            if learn.engine.rank == 0 and len(self.saved) > self.keep:
                for gone in self.saved[: -self.keep]:
                    gone.unlink(missing_ok=True)
                self.saved = self.saved[-self.keep :]
        return path

    def state_dict(self) -> dict[str, Any]:
        """The epoch-start RNG state, so checkpoints later in a resumed epoch can still reproduce it."""
        return {"epoch_rng": self._epoch_rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`."""
        self._epoch_rng = state["epoch_rng"]
