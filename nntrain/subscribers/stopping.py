"""Watching a logged value: `Monitor` (the rule), `EarlyStoppingS` and `SaveBestS`.

Both read the values subscribers log through `learn.log`, from `learn.logs` (`MetricsS`:
`train/loss`, `valid/loss`, `valid/<metric>`), the same names on both engines, once per epoch
after its last pass (validation when the fit validates, else training).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from nntrain.checkpoint import CheckpointError, remove_stale_temporaries_of
from nntrain.events import CancelFitException, Subscriber, declared

__all__ = ["Monitor", "EarlyStoppingS", "SaveBestS", "monitored_value"]


class Monitor:
    """The best value of one logged metric so far and whether a new value improves on it, by
    Lightning's `EarlyStopping` rule: `value + min_delta < best` for `mode="min"`,
    `value - min_delta > best` for `"max"`.

    Raises:
        ValueError: `mode` not "min"/"max", or a negative `min_delta`.
    """

    def __init__(self, name: str, mode: str = "min", min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.name, self.mode, self.min_delta = name, mode, float(min_delta)
        self.reset()

    def reset(self) -> None:
        """No value seen yet."""
        self.best = math.inf if self.mode == "min" else -math.inf

    def improves(self, value: float) -> bool:
        """Whether `value` beats the best by more than `min_delta` (then it becomes the best)."""
        better = value + self.min_delta < self.best if self.mode == "min" else value - self.min_delta > self.best
        if better:
            self.best = value
        return better


def check_monitored(learn: Any, name: str, who: str) -> None:
    """Before the fit: raise when no subscriber logs `name` (subscribers declare what they log
    with `logged_names(learn)`), naming what is logged."""
    names = {logged for sub in learn.subs for logged in declared(sub, "logged_names")(learn)}
    if not names:
        raise ValueError(f"{who} monitors {name!r}, but no subscriber logs values: attach a MetricsS")
    if name not in names:
        raise ValueError(f"{who} monitors {name!r}, which is not logged in this fit; logged: {sorted(names)}")


def monitored_value(learn: Any, name: str) -> float:
    """The value of `name` logged for this epoch (`learn.logs`)."""
    return float(learn.logs[name])


def _epoch_done(learn: Any) -> bool:
    """Whether this `after_epoch` ends the epoch: its validation pass, or its training pass when
    the fit does not validate."""
    return learn.mode == "valid" or (learn.mode == "train" and not learn.fit_valid)


class EarlyStoppingS(Subscriber):
    """Stops the fit when `monitor` has not improved (see `Monitor`) for `patience` epochs, or is
    not finite: after the same epoch as Lightning's `EarlyStopping` with the same arguments.
    It counts in `after_epoch`, before `CheckpointS` saves (the count is in the epoch's
    checkpoint), and stops with a `CancelFitException` raised in `cleanup_epoch`, once every
    subscriber has ended the epoch (its checkpoint and best weights are written); `after_fit`
    does not fire.
    `stopped_epoch` is the epoch it stopped after (None if it did not), `wait` the epochs
    without improvement. Its state goes into checkpoints.

    Raises:
        ValueError: a bad `mode`, `min_delta` or `patience`; at `before_fit`, a `monitor` no
            subscriber logs in this fit.
    """

    order = 900  # after MetricsS (0) and SaveBestS (800) in after_epoch, before CheckpointS (1000) saves
    one_rank_cancels = False  # cancels from the monitored value, which is global under DDP
    needed_on_resume = True  # its state shapes the rest of the run

    def __init__(
        self,
        monitor: str = "valid/loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int, got {patience!r}")
        self.tracker = Monitor(monitor, mode, min_delta)
        self.monitor, self.patience, self.check_finite = monitor, patience, check_finite
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._stop = False

    def before_fit(self, learn: Any) -> None:
        """Check the monitored value is logged; start counting afresh."""
        check_monitored(learn, self.monitor, "EarlyStoppingS")
        self.tracker.reset()
        self.wait, self.stopped_epoch, self._stop = 0, None, False

    def after_epoch(self, learn: Any) -> None:
        """Count an epoch without improvement; stop after `patience` of them."""
        if not _epoch_done(learn):
            return
        value = monitored_value(learn, self.monitor)
        if self.check_finite and not math.isfinite(value):  # first, as Lightning: -inf is no improvement
            self._stop_after(learn)
            return
        if self.tracker.improves(value):
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self._stop_after(learn)

    def _stop_after(self, learn: Any) -> None:
        self.stopped_epoch = learn.epoch
        self._stop = learn.epoch + 1 < learn.n_epochs  # after the last epoch the fit ends anyway
        learn.finished = True  # checkpoints from here on hold a finished run

    def cleanup_epoch(self, learn: Any) -> None:
        """Stop the fit once the epoch that decided it has ended everywhere."""
        if self._stop:
            self._stop = False
            raise CancelFitException()

    def state_dict(self) -> dict[str, Any]:
        """Best value, epochs waited and the stop, for checkpoints."""
        return {"best": self.tracker.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue counting from `state_dict`."""
        self.tracker.best, self.wait, self.stopped_epoch = state["best"], state["wait"], state["stopped_epoch"]


class SaveBestS(Subscriber):
    """Keeps the weights of the best epoch by `monitor` in one file `path`, written atomically
    (as checkpoints are) by rank 0 whenever the value improves (see `Monitor`).

    `best_score`, `best_epoch` and `best_path` (None until written) tell where it is;
    `load_best(learn)` (or `learn.load(path)`) puts those weights back. With `with_opt` the file
    also holds the optimizer state.

    A killed run's half-written temporary of `path` is removed at the next `before_fit`. A write
    that fails (a full disk) is raised in `cleanup_epoch`, after `CheckpointS` saved the epoch.

    Raises:
        ValueError: a bad `mode`/`min_delta`; at `before_fit`, a `monitor` no subscriber logs, or
            a `path` that is a directory or cannot be written.
        CheckpointError: in `cleanup_epoch`, the best weights could not be written.
    """

    order = 800  # after MetricsS (0) logged the epoch, before CheckpointS (1000) saves its state
    one_rank_cancels = False  # never cancels

    def __init__(
        self,
        path: str | os.PathLike,
        monitor: str = "valid/accuracy",
        mode: str = "max",
        min_delta: float = 0.0,
        with_opt: bool = False,
    ) -> None:
        self.path = Path(path)
        self.tracker = Monitor(monitor, mode, min_delta)
        self.monitor, self.with_opt = monitor, with_opt
        self.best_epoch: int | None = None
        self.best_path: Path | None = None
        self._failed: Exception | None = None  # a failed write, raised in cleanup_epoch

    @property
    def best_score(self) -> float | None:
        """The best value so far (None before the first epoch)."""
        return None if math.isinf(self.tracker.best) else self.tracker.best

    def before_fit(self, learn: Any) -> None:
        """Check the monitored value is logged and `path` can be written, before any batch."""
        check_monitored(learn, self.monitor, "SaveBestS")
        if self.path.is_dir():
            raise ValueError(f"SaveBestS path {self.path} is a directory: give a file name (best.pt)")
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise ValueError(f"SaveBestS cannot write in {parent}: choose a writable path")
        if learn.engine.rank == 0:
            remove_stale_temporaries_of(self.path)  # a killed run's half-written best file
        self._failed = None

    def after_epoch(self, learn: Any) -> None:
        """Write the weights when the epoch's value is the best so far."""
        if not _epoch_done(learn):
            return
        value = monitored_value(learn, self.monitor)
        before = self.tracker.best
        if math.isfinite(value) and self.tracker.improves(value):
            if learn.engine.rank == 0:
                try:
                    learn.save(self.path, with_opt=self.with_opt)
                except (CheckpointError, OSError) as exc:  # a full disk: raised once the epoch is saved
                    self.tracker.best, self._failed = before, exc
                    return
            self.best_epoch, self.best_path = learn.epoch, self.path

    def cleanup_epoch(self, learn: Any) -> None:
        """Raise a failed write of the best weights, now that `CheckpointS` has saved the epoch
        (the epoch need not be trained again)."""
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed

    def load_best(self, learn: Any) -> None:
        """Load the best weights (and optimizer state, if saved) into `learn`.

        Raises:
            ValueError: nothing was saved yet.
        """
        if self.best_path is None:
            raise ValueError(f"SaveBestS has saved nothing yet (no epoch has ended with {self.monitor} logged)")
        learn.load(self.best_path, with_opt=self.with_opt)

    def state_dict(self) -> dict[str, Any]:
        """The best value, its epoch and the file, for checkpoints."""
        return {
            "best": self.tracker.best,
            "epoch": self.best_epoch,
            "path": None if self.best_path is None else str(self.best_path),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`."""
        self.tracker.best, self.best_epoch = state["best"], state["epoch"]
        self.best_path = None if state["path"] is None else Path(state["path"])
