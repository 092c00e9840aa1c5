"""TensorBoard logging: `TensorBoardS` writes a fit's losses, learning rates, epoch metrics and
hyperparameters as TensorBoard event files, with the same tags on both engines."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nntrain.events import Subscriber, declared
from nntrain.logs import make_log_dir
from nntrain.optim import get_lr

__all__ = ["TensorBoardS", "BATCH_LOSS", "BATCH_LR", "epoch_tag", "make_log_dir", "next_version_dir"]

BATCH_LOSS = "batch/loss"
"""Tag of the training loss of each batch; step = optimizer steps taken before the batch."""

BATCH_LR = "batch/lr"
"""Tag of the learning rate of each training batch's optimizer step; same steps as `BATCH_LOSS`."""

_VERSION = re.compile(r"^version_(\d+)$")


def epoch_tag(mode: str, name: str) -> str:
    """Tag of a `MetricsS` value: `epoch/train_loss`, `epoch/valid_accuracy`; step = epoch."""
    return f"epoch/{mode}_{name}"


def next_version_dir(root: str | os.PathLike[str]) -> Path:
    """Create and return `root/version_N`, N one past the highest version there (0 for none),
    as Lightning's `TensorBoardLogger` numbers its runs. A directory is never reused.

    Raises:
        OSError: `root` cannot be created or written to.
    """
    root = make_log_dir(root)
    versions = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _VERSION.match(p.name))]
    version = max(versions, default=-1) + 1
    while True:
        path = root / f"version_{version}"
        try:
            path.mkdir()  # fails if another run claimed it since the listing
            return path
        except FileExistsError:
            version += 1
        except OSError as exc:
            raise OSError(f"cannot create the TensorBoard run directory '{path}': {exc.strerror or exc}") from exc


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TensorBoardS(Subscriber):
    """Writes the fit to TensorBoard: per training batch `batch/loss` and `batch/lr` (step = the
    learner's `global_step` before the batch's optimizer step), per epoch every scalar of the
    `MetricsS` row as `epoch/<mode>_<name>` (step = epoch), and the run's hyperparameters (lr,
    batch_size, epochs, optimizer, model, engine) for the HParams dashboard.

    Each fit is one run in `log_dir/name/version_N` (`log_dir/version_N` without a name), N one
    past the highest version there, so runs are never overwritten or mixed. Under Lightning,
    when the Trainer has a `TensorBoardLogger`, the events go into that logger's file (its
    directory, its layout) and the hyperparameters also through `logger.log_hyperparams`;
    otherwise this subscriber opens its own writer. The tags are the same on both engines.

    No device sync per batch: the detached loss tensors (and the lrs, Python floats) are
    buffered and written when the epoch ends, with one host copy for the epoch; a cancelled or
    failed epoch is written at its cleanup. Event files are flushed at every epoch's end, so
    TensorBoard shows a run's batches one epoch at a time. Only rank 0 writes.

    Args:
        log_dir: root directory of the runs (`tensorboard --logdir <log_dir>` shows them).
        name: a subdirectory for this experiment's versions; None puts them in `log_dir`.

    Raises:
        OSError: at `before_fit`, before any batch, when the run directory cannot be created.
    """

    reports = True  # lr_find detaches it during the search

    order = 20  # after MetricsS (0) has made the epoch's row
    one_rank_cancels = False  # never cancels

    def __init__(self, log_dir: str | os.PathLike[str] = "runs", name: str | None = None) -> None:
        self.root = Path(log_dir)
        self.name = name
        self.log_dir: Path | None = None  # the current (or last) run's directory, set at before_fit
        self._writer: Any = None
        self._owns_writer = False
        self._steps: list[int] = []
        self._losses: list[torch.Tensor] = []
        self._lrs: list[float] = []

    def engine_needs(self) -> dict[str, Any]:
        """An engine with loggers (Lightning) gets a TensorBoard logger at this place, and this
        subscriber writes through it (one event file per run)."""
        return {"tensorboard_dir": self.root, "tensorboard_name": self.name}

    # ----- events ----------------------------------------------------------------------------------

    def before_fit(self, learn: Any) -> None:
        """Open the run (a new version directory, or the Trainer's TensorBoardLogger) and write
        the hyperparameters."""
        self._clear()
        self._writer = None
        if not _is_rank_zero():
            return
        logger = learn.engine.tensorboard_logger()
        params = self.hyperparameters(learn)
        if logger is not None:
            self._writer, self._owns_writer = logger.experiment, False
            self.log_dir = Path(logger.log_dir)
            # metrics={} records them (hparams.yaml) without Lightning's placeholder hp_metric
            # scalar; the TensorBoard summaries are written below, as on the native engine.
            logger.log_hyperparams(params, metrics={})
        else:
            root = self.root / self.name if self.name else self.root
            self.log_dir = next_version_dir(root)
            from torch.utils.tensorboard import (
                SummaryWriter,  # imported when used: `import nntrain` stays fast
            )

            self._writer, self._owns_writer = SummaryWriter(log_dir=str(self.log_dir)), True
        file_writer = self._writer._get_file_writer()  # as Lightning's log_hyperparams does
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(params, self._declared_metrics(learn)):
            file_writer.add_summary(summary)

    def after_loss(self, learn: Any) -> None:
        """Buffer the training loss (detached: no sync), its step and its lr."""
        if self._writer is None or not learn.model.training:
            return
        self._steps.append(learn.global_step)
        self._losses.append(learn.loss.detach())
        self._lrs.append(get_lr(learn.opt))

    def after_epoch(self, learn: Any) -> None:
        """Write the values logged for this pass (`learn.logs`: Python floats already)."""
        if self._writer is None:
            return
        mode = learn.mode
        prefix = f"{mode}/"
        for name, value in learn.logs.items():
            if name.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(epoch_tag(mode, name[len(prefix) :]), value, learn.epoch)

    def cleanup_epoch(self, learn: Any) -> None:
        """Write the epoch's buffered batches (one host copy) and flush the event file."""
        if self._writer is not None:
            self._write_batches()
            self._writer.flush()

    def cleanup_fit(self, learn: Any) -> None:
        """Write what is left, flush, and close the writer if it is ours (Lightning closes its own)."""
        if self._writer is None:
            return
        try:
            self._write_batches()
            self._writer.flush()
        finally:
            if self._owns_writer:
                self._writer.close()
            self._writer = None
            self._clear()

    # ----- helpers -----------------------------------------------------------------------------------

    def hyperparameters(self, learn: Any) -> dict[str, Any]:
        """The run's hyperparameters, as written to the HParams dashboard."""
        params: dict[str, Any] = {
            "lr": float(get_lr(learn.opt)),
            "epochs": int(learn.n_epochs),
            "optimizer": type(learn.opt).__name__,
            "model": type(learn.model).__name__,
            "engine": learn.engine.name,
        }
        batch_size = getattr(learn.dls.train, "batch_size", None)
        if isinstance(batch_size, int):
            params["batch_size"] = batch_size
        return params

    def _declared_metrics(self, learn: Any) -> dict[str, float]:
        """The epoch tags the HParams dashboard shows as metrics (only the names are used)."""
        names = [name for sub in learn.subs for name in declared(sub, "logged_names")(learn)]
        return {epoch_tag(*name.split("/", 1)): 0.0 for name in names if "/" in name}

    def _write_batches(self) -> None:
        if not self._losses:
            return
        losses = torch.stack(self._losses).float().reshape(-1).cpu().tolist()  # the epoch's one sync
        writer = self._writer
        for step, loss, lr in zip(self._steps, losses, self._lrs):
            writer.add_scalar(BATCH_LOSS, loss, step)
            writer.add_scalar(BATCH_LR, lr, step)
        self._clear()

    def _clear(self) -> None:
        self._steps, self._losses, self._lrs = [], [], []
