"""A bridged run that fails: what Lightning's `OnExceptionCheckpoint` writes, and the clear error
for a native checkpoint given to a Trainer as `ckpt_path`.

`OnExceptionCheckpoint` saves in its `on_exception`, after the bridge's callback has fired the
cleanups (Lightning orders checkpoint callbacks last). So the learner state it writes is taken
before the cleanups (`ExceptionState.state_at_exception`): the position of the last training
batch that ended, with its RNG, and the loader position matched to it (Lightning records the
batches fetched, the failing one included). That state continues exactly when the exception came
inside a training pass, after one of its batches ended and before the failing batch's backward
(a data error, a failed forward or loss, a subscriber's check in `before_batch` or `after_loss`);
anywhere else (in backward or after the step, in validation, before an epoch's first batch
ended) the file is marked, and a fit resuming from it is refused before its first batch.
"""

from __future__ import annotations

from typing import Any

from nntrain.checkpoint_state import REQUIRED_KEYS, capture
from nntrain.rng import rng_state

__all__ = [
    "ExceptionState",
    "has_exception_checkpoint",
    "match_loader_position",
    "NOT_RESUMABLE",
    "refuse_not_resumable",
    "native_ckpt_path_error",
]

NOT_RESUMABLE = "not_resumable"
"""The key of the learner state (`"nntrain"` entry) that says where an on-exception checkpoint
was taken when a fit cannot continue from it exactly."""


def has_exception_checkpoint(trainer: Any) -> bool:
    """Whether the Trainer has a callback that saves when the run fails (`OnExceptionCheckpoint`)."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    return any(isinstance(cb, OnExceptionCheckpoint) for cb in trainer.callbacks)


class ExceptionState:
    """The clean point of a running training pass, kept while a Trainer has an
    `OnExceptionCheckpoint`: the position and RNG state after the last training batch that
    ended (one RNG read per training batch, about 10 us), and whether the running batch has
    started its backward (`LightningEngine.backward_started`)."""

    def __init__(self) -> None:
        self.snapshot: tuple[int, int, dict[str, Any], int] | None = None  # epoch, iter, rng, global_step

    def pass_opened(self) -> None:
        """A training pass starts: no batch of it has ended yet."""
        self.snapshot = None

    def batch_ended(self, learn: Any, iter_: int) -> None:
        """Training batch `iter_` ended: a clean point."""
        self.snapshot = (learn.epoch, iter_, rng_state(), learn.global_step)
        learn.engine.backward_started = False

    def state_at_exception(self, learn: Any) -> dict[str, Any]:
        """The learner state for an on-exception checkpoint, taken before the cleanups run: the
        clean point's, or the present one marked `NOT_RESUMABLE` with where it was taken."""
        snap, epoch = self.snapshot, learn.epoch
        why = None
        if learn.mode != "train" or learn.dispatch.top in (None, "fit"):
            why = f"outside a training pass (at epoch {epoch}, after its {learn.mode} pass began)"
        elif snap is None or snap[0] != epoch:
            why = f"before the first training batch of epoch {epoch} ended"
        elif learn.global_step != snap[3] or learn.engine.backward_started:
            why = f"inside training batch {learn.iter} of epoch {epoch}, after its backward began"
        if why is None and snap is not None:
            return capture(learn, snap[0], snap[1], snap[2])
        state = capture(learn, epoch, learn.iter)
        state[NOT_RESUMABLE] = why
        return state


def match_loader_position(checkpoint: dict[str, Any], iter_: int | None) -> None:
    """Make the training loader's saved position in a Lightning `checkpoint` the learner's: the
    batches after `iter_` are served again on resume (Lightning counted the failing one fetched)."""
    if iter_ is None:
        return
    loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    for state in loops.get("combined_loader", None) or []:
        if isinstance(state, dict) and isinstance(state.get("served"), int) and state["served"] > iter_ + 1:
            state["served"] = iter_ + 1


def refuse_not_resumable(path: Any, entry: dict[str, Any]) -> None:
    """Refuse a fit resuming from an on-exception checkpoint that cannot continue exactly.

    Raises:
        ValueError: naming where it was taken and what to resume from instead.
    """
    why = entry.get(NOT_RESUMABLE)
    if why:
        raise ValueError(
            f"checkpoint {path} was written by OnExceptionCheckpoint {why}: it does not hold a state a fit can "
            "continue exactly. Resume from the newest checkpoint written at a clean point (CheckpointS(dir, "
            "every_batches=N) or ModelCheckpoint), or load its weights with trainer.validate(ckpt_path=...)"
        )


def native_ckpt_path_error(trainer: Any, exception: BaseException) -> ValueError | None:
    """The error to raise instead of Lightning's `KeyError: 'pytorch-lightning_version'` when the
    Trainer's `ckpt_path` is a native nntrain checkpoint; None for any other failure."""
    if not (isinstance(exception, KeyError) and exception.args == ("pytorch-lightning_version",)):
        return None
    path = getattr(trainer, "ckpt_path", None)
    if not path:
        return None
    from nntrain.checkpoint import read_checkpoint

    try:
        state = read_checkpoint(path, "cpu")
    except Exception:  # unreadable: Lightning's own error stands
        return None
    if not all(key in state for key in REQUIRED_KEYS):
        return None
    return ValueError(
        f"ckpt_path {str(path)!r} is a native nntrain checkpoint, which a Trainer cannot load: continue it with "
        f"learn.fit(epochs, engine='lightning', resume={str(path)!r}) (the learner loads it and the Trainer runs "
        f"the epochs left), or load its weights with learn.load({str(path)!r})"
    )
