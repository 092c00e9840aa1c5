"""`NanGuardS`: stop a fit whose training loss turns NaN or inf, naming the epoch and batch."""

from __future__ import annotations

from typing import Any

import torch

from nntrain.events import Subscriber

__all__ = ["NanGuardS", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or inf; the message names the epoch and batch."""


class NanGuardS(Subscriber):
    """Raises `NonFiniteLossError` when a training loss is NaN or inf (opt-in).

    Per batch it only records `torch.isfinite(loss)` on the loss's device (no host read); the flags
    are read every `check_every` training batches and at the end of each training pass, one
    device-to-host copy each. The trade-off: with `check_every > 1` the error comes up to
    `check_every - 1` batches late (it still names the first bad batch). A `CheckpointS` never
    writes NaN/inf weights whatever `check_every` is (it checks the weights when it saves), and
    this guard runs just before it, so a due check stops the fit before that batch is saved.

    Args:
        check_every: training batches between host reads of the flags (1: every batch, exact stop).
    """

    order = 999  # just before CheckpointS (1000): a due check runs before that batch is saved
    one_rank_cancels = False  # raises an error, never a cancel

    def __init__(self, check_every: int = 1) -> None:
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        self.check_every = check_every
        self._flags: list[torch.Tensor] = []
        self._where: list[tuple[int, int]] = []

    def before_epoch(self, learn: Any) -> None:
        """Start with no pending flags."""
        self._flags, self._where = [], []

    def after_loss(self, learn: Any) -> None:
        """Record whether the training loss is finite, on its device."""
        if learn.model.training:
            self._flags.append(torch.isfinite(learn.loss.detach()).all())
            self._where.append((learn.epoch, learn.iter))

    def after_batch(self, learn: Any) -> None:
        """Read the flags every `check_every` training batches."""
        if len(self._flags) >= self.check_every:
            self.check()

    def after_epoch(self, learn: Any) -> None:
        """Read the flags left at the end of the pass."""
        self.check()

    def check(self) -> None:
        """Read the pending flags (one host copy).

        Raises:
            NonFiniteLossError: a pending loss was NaN or inf; names the first such batch.
        """
        if not self._flags:
            return
        flags, where = torch.stack(self._flags), self._where
        self._flags, self._where = [], []
        if not bool(flags.all()):
            epoch, batch = where[int((~flags).nonzero()[0])]
            raise NonFiniteLossError(
                f"the training loss is NaN or inf at epoch {epoch}, batch {batch}; "
                f"stopping (no checkpoint is written with these weights)"
            )
