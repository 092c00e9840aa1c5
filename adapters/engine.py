"""`LightningEngine`: what a learner and its subscribers get from a Lightning Trainer (the
`nntrain.engines.Engine` protocol), and the Trainer set-ups the bridge refuses up front."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from nntrain.checkpoint import atomic_write
from nntrain.optim import get_lr

if TYPE_CHECKING:
    from nntrain.adapters.module import LearnerModule

__all__ = [
    "LightningEngine",
    "REFUSED_CALLBACKS",
    "refuse_callbacks",
    "refuse_unsupported",
    "take_trainer_recipes",
    "give_back_trainer_recipes",
]

REFUSED_CALLBACKS: dict[str, str] = {
    "LearningRateFinder": "Lightning's LR finder (Tuner.lr_find) needs automatic optimization and "
    "changes the learner's state; use learn.lr_find(engine='lightning'), which searches under Lightning "
    "and puts the learner back",
    "BatchSizeFinder": "Lightning's batch-size finder (Tuner.scale_batch_size) rebuilds the learner's "
    "loaders; pick the batch size with DataLoaders.from_hf_dd(..., batch_size=...)",
    "StochasticWeightAveraging": "it needs Lightning's LR-scheduler path, which the learner's manual "
    "optimization does not use; average weights in a subscriber with torch.optim.swa_utils.AveragedModel",
    "BackboneFinetuning": "it edits the optimizer's param groups behind the learner; freeze and unfreeze "
    "layers in a subscriber's before_epoch (requires_grad_) on either engine",
    "GradientAccumulationScheduler": "it changes Lightning's accumulate_grad_batches by epoch, which Lightning "
    "refuses under the learner's manual optimization; accumulate a fixed number of batches with "
    "GradAccumS(n) (or the Trainer's accumulate_grad_batches=n, which runs as GradAccumS) on either engine",
}
"""Lightning callbacks that cannot give the native numbers under the bridge, with the alternative."""


def refuse_callbacks(callbacks: list[Any]) -> None:
    """Raise for a callback of `REFUSED_CALLBACKS`, naming the alternative."""
    for cb in callbacks:
        why = REFUSED_CALLBACKS.get(type(cb).__name__)
        if why is not None:
            raise ValueError(f"{type(cb).__name__} is not supported by the nntrain bridge: {why}")


def refuse_unsupported(trainer: L.Trainer, stage: str) -> None:
    """Raise before the first batch for Trainer set-ups the bridge cannot run with native numbers.

    Raises:
        ValueError: naming the option or callback and what to use instead.
    """
    refuse_callbacks(trainer.callbacks)  # type: ignore[attr-defined]  # set in Trainer.__init__
    if stage == "fit" and trainer.max_epochs in (None, -1):
        steps = (
            f"max_steps={trainer.max_steps} without max_epochs" if trainer.max_steps != -1 else "max_epochs=-1 (no end)"
        )
        raise ValueError(
            f"Trainer({steps}) is not supported by the nntrain bridge: an nntrain fit counts epochs "
            "(learn.n_epochs, which EarlyStoppingS, schedules and progress read); give max_epochs as well "
            "(Lightning stops at whichever limit comes first), or use learn.fit(epochs, engine='lightning', "
            "max_steps=...)"
        )
    if stage == "fit" and trainer.val_check_interval != 1.0:
        raise ValueError(
            f"val_check_interval={trainer.val_check_interval!r} is not supported by the nntrain bridge: "
            "an epoch is a training pass then one validation pass on both engines; validate more often "
            "with shorter epochs (limit_train_batches=0.5) or every few epochs (check_val_every_n_epoch)"
        )


def take_trainer_recipes(trainer: L.Trainer) -> tuple[list[Any], dict[str, Any]]:
    """The subscribers that do what the Trainer's `gradient_clip_val` / `gradient_clip_algorithm`
    and `accumulate_grad_batches` ask (`nntrain.recipes.gradient_recipes`: Lightning cannot under
    manual optimization), and the flags taken off the Trainer to do it (`give_back_trainer_recipes`
    puts them back). Called before Lightning checks its configuration."""
    from nntrain.recipes import gradient_recipes

    clip = trainer.gradient_clip_val
    algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
    subs = gradient_recipes(clip, algorithm, trainer.accumulate_grad_batches)
    taken: dict[str, Any] = {}
    if clip is not None and clip > 0:
        taken["gradient_clip_val"] = clip
        trainer.gradient_clip_val = None
    if trainer.accumulate_grad_batches != 1:
        taken["accumulate_grad_batches"] = trainer.accumulate_grad_batches
        trainer.accumulate_grad_batches = 1
    return subs, taken


def give_back_trainer_recipes(trainer: L.Trainer, taken: dict[str, Any]) -> None:
    """Put back the flags `take_trainer_recipes` took off the Trainer."""
    for name, value in taken.items():
        setattr(trainer, name, value)


class LightningEngine:
    """The engine of a learner under Lightning: backward through `manual_backward`, the step
    through Lightning's optimizer wrapper (precision plugins and strategies apply), cancels as
    `trainer.should_stop` (agreed between DDP ranks: `agree_cancel`), epoch values through
    `LightningModule.log` and the Trainer's loggers, checkpoints through `trainer.save_checkpoint`.

    With a gradient scaler (`16-mixed`), the learner's `grad_scaling` is a
    `nntrain.amp.GradScaling` around the plugin's scaler (the one `MixedPrecisionS` runs), so
    `after_backward` sees unscaled gradients and a skipped step is a cancelled step.
    """

    name = "lightning"
    saves_on_interrupt = False  # Lightning handles Ctrl-C itself
    resumes_after_last_batch = False  # Lightning resumes such a checkpoint at the next epoch
    runs_compiled_steps = False

    def __init__(self, module: LearnerModule, trainer: L.Trainer) -> None:
        self.module = module
        self.trainer = trainer
        self.rank = trainer.global_rank
        precision = str(trainer.precision)
        self.precision = None if precision in ("32-true", "32", "64-true", "64") else precision
        self.scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.claimed: list[Any] = []  # loggers a subscriber writes through itself
        bar = trainer.progress_bar_callback
        self.shows_progress = bar is not None and bool(getattr(bar, "is_enabled", True))  # its bar wins
        self.logs_steps = bool(trainer.loggers) or bar is not None
        self._cancel_group: Any = None
        self.backward_started = False  # the running training batch has begun its backward

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate through Lightning (precision scaling, strategy hooks)."""
        self.backward_started = True  # the batch's gradients change from here (an on-exception save reads it)
        self.module.manual_backward(loss)

    def step(self, opt: Any) -> None:
        """Lightning's optimizer step (its precision plugin and strategy apply)."""
        opt.step()

    def on_cancel(self, scope: str) -> None:
        """A cancelled fit stops the Trainer."""
        if scope == "fit":
            self.trainer.should_stop = True

    def agree_cancel(self, code: int) -> int:
        """The widest cancel code any rank raised at this point: a MAX all-reduce of one integer
        on a gloo group, so a GPU run waits for no device work."""
        import torch.distributed as dist

        if self._cancel_group is None:  # made at the first agreement, which every rank reaches together
            self._cancel_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        flag = torch.tensor([code], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cancel_group)
        return int(flag[0])

    def close(self) -> None:
        """Free what the engine made for this fit (the cancel group)."""
        import torch.distributed as dist

        group, self._cancel_group = self._cancel_group, None
        if group is not None and group is not dist.group.WORLD:
            dist.destroy_process_group(group)

    def log_metrics(self, values: dict[str, float]) -> None:
        """`LightningModule.log` for `callback_metrics` (EarlyStopping, ModelCheckpoint, the
        dicts `trainer.validate` and `trainer.test` return), and every logger no subscriber
        writes through itself."""
        sync = self.trainer.world_size > 1  # values are already global; this only silences a warning
        if self.trainer.state.fn != "fit":  # validate/test return only what is logged for loggers
            with warnings.catch_warnings():  # our own call: "logger=True but no logger configured"
                warnings.filterwarnings("ignore", ".*no logger configured.*")
                for name, value in values.items():
                    self.module.log(
                        name, _exact(value), on_step=False, on_epoch=True, sync_dist=sync, logger=True, batch_size=1
                    )
            return
        for name, value in values.items():  # on the progress bar, which shows them instead of MetricsS's rows
            self.module.log(
                name,
                _exact(value),
                on_step=False,
                on_epoch=True,
                sync_dist=sync,
                logger=False,
                batch_size=1,
                prog_bar=self.shows_progress,
            )
        loggers = [lg for lg in self.trainer.loggers if lg not in self.claimed]
        if loggers and self.rank == 0:
            step = self.trainer.global_step
            for lg in loggers:
                lg.log_metrics({**values, "epoch": self.module.learn.epoch}, step=step)

    def log_step(self, loss: torch.Tensor) -> None:
        """The training loss on the progress bar (read when it refreshes), and with the lr to the
        loggers no subscriber writes through every `log_every_n_steps` steps (one host read then)."""
        trainer = self.trainer
        if trainer.progress_bar_callback is not None:
            self.module.log("loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, logger=False)
        loggers = [lg for lg in trainer.loggers if lg not in self.claimed]
        if loggers and self.rank == 0 and self.module.learn.global_step % trainer.log_every_n_steps == 0:  # type: ignore[attr-defined]
            values = {"train/loss_step": float(loss.detach()), "train/lr": float(get_lr(self.module.learn.opt))}
            for lg in loggers:
                lg.log_metrics(values, step=self.module.learn.global_step)

    def save_checkpoint(self, stem: Any, learner_state: dict[str, Any], learn: Any) -> Path:
        """A Lightning checkpoint `<stem>.ckpt` through the Trainer (every rank takes part; rank 0
        writes), with `learner_state` as its `"nntrain"` entry."""
        self.module.pending_state = learner_state
        try:
            return atomic_write(f"{stem}.ckpt", self.trainer.save_checkpoint, commit=self.trainer.is_global_zero)
        finally:
            self.module.pending_state = None

    def tensorboard_logger(self) -> Any:
        """The Trainer's first `TensorBoardLogger`, claimed by the asking subscriber (the bridge
        then logs nothing to it itself), or None."""
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = next((lg for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is not None and logger not in self.claimed:
            self.claimed.append(logger)
        return logger


def _exact(value: float) -> torch.Tensor:
    """A logged value as a float64 tensor: Lightning keeps its dtype, so `trainer.validate`,
    `trainer.test` and `callback_metrics` hold the native value, not a float32 rounding of it."""
    return torch.tensor(value, dtype=torch.float64)
