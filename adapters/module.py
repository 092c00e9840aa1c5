"""`LearnerModule`: a LightningModule whose steps are a Learner's own `run_step`.

Lightning drives the loop; the learner's `predict`, `get_loss`, `backward`, `step` and
`zero_grad` (and any subclass override of them) do the work, with `backward` going through
`manual_backward` and `step` through Lightning's optimizer wrapper, so precision plugins and
strategies (DDP) apply.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch

from nntrain.learner import (
    CancelBatchException,
    CancelEpochException,
    CancelException,
    CancelFitException,
    Learner,
    NativeEngine,
    event_handlers,
    get_lr,
    set_lr,
)
from nntrain.checkpoint import apply_subscriber_states, rng_state, set_grads, set_rng_state

__all__ = ["Flow", "LearnerModule", "LightningEngine", "ForeignOptimizer", "CHECKPOINT_KEY"]

CHECKPOINT_KEY = "nntrain"
"""The entry `LearnerModule` adds to Lightning checkpoints: the learner state Lightning does not keep."""

CHECKPOINT_FORMAT = 1


def loader_cannot_resume(what: str, pos: dict[str, Any], loader: Any, note: str = "") -> ValueError:
    """The error for a checkpoint taken inside an epoch whose training loader cannot continue it."""
    return ValueError(
        f"{what} was taken inside epoch {pos['epoch']} (after training batch {pos['iter']}), but the "
        f"training loader ({type(loader).__name__}) cannot continue an epoch{note}: make it a "
        "nntrain.data.ResumableDataLoader (DataLoaders.from_hf_dd does), or resume from a checkpoint "
        "taken at an epoch's end"
    )


class Flow:
    """Cancellation state shared by the module and the subscriber callbacks of one fit.

    Scopes are identified by keys: an epoch by `(epoch, mode)`, a batch by `(epoch key,
    batch_idx)`. A cancel marks its scope; events of a marked scope (and of scopes inside it)
    no longer fire, but the cleanups of scopes that were opened do.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new fit."""
        self.fit_cancelled = False
        self.cancelled_epoch: tuple | None = None
        self.cancelled_batch: tuple | None = None
        self.current_batch: tuple | None = None  # key of the batch whose state is in the learner
        self.last_mode: str | None = None  # mode of the last epoch started ("train"/"valid")
        self.skip: tuple | None = None  # (epoch key, n): a resumed epoch's first n batches, already trained

    def skipped(self, epoch_key: tuple, batch_idx: int) -> bool:
        """Whether this batch was trained before the checkpoint a resumed fit started from."""
        return self.skip is not None and self.skip[0] == epoch_key and batch_idx < self.skip[1]

    def cancel(self, exc: CancelException, epoch_key: tuple | None, batch_key: tuple | None) -> None:
        """Record `exc` raised inside the given epoch and batch."""
        if isinstance(exc, CancelFitException):
            self.fit_cancelled = True
        elif isinstance(exc, CancelEpochException):
            self.cancelled_epoch = epoch_key
        elif isinstance(exc, CancelBatchException):
            self.cancelled_batch = batch_key

    def epoch_live(self, epoch_key: tuple) -> bool:
        """Whether events of this epoch still fire."""
        return not self.fit_cancelled and self.cancelled_epoch != epoch_key

    def batch_live(self, epoch_key: tuple, batch_key: tuple) -> bool:
        """Whether events of this batch still fire."""
        return self.epoch_live(epoch_key) and self.cancelled_batch != batch_key


class LightningEngine:
    """The engine a learner uses under Lightning: backward through `manual_backward`."""

    name = "lightning"

    def __init__(self, module: L.LightningModule) -> None:
        self.module = module

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate through Lightning (precision scaling, strategy hooks)."""
        self.module.manual_backward(loss)

    def tensorboard_logger(self) -> Any:
        """The Trainer's first `TensorBoardLogger`, for subscribers that write through it, or None."""
        from lightning.pytorch.loggers import TensorBoardLogger

        return next((lg for lg in self.module.trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class ForeignOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` around a hand-written optimizer (an object with `step`,
    `zero_grad` and `lr`), so Lightning, which requires a torch optimizer, can drive it.

    The learning rate in `param_groups` is the source of truth; it is copied to the inner
    optimizer before each step, so LR changes made through `param_groups` take effect.
    """

    def __init__(self, inner: Any, params: Any) -> None:
        super().__init__(list(params), {"lr": get_lr(inner)})
        self.inner = inner

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - documented on the class
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        set_lr(self.inner, self.param_groups[0]["lr"])
        self.inner.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        self.inner.zero_grad()


class LearnerModule(L.LightningModule):
    """Runs `learn` under a `lightning.Trainer`; pair it with `subscriber_callbacks(learn)`.

    `learn.model` becomes this module's `model` submodule (the same object), so weights trained
    here are the learner's. Optimization is manual: Lightning calls `training_step`, which runs
    `learn.run_step()`.
    """

    def __init__(self, learn: Learner, train: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.learn = learn
        self.model = learn.model
        self.train_enabled = train
        self.flow = Flow()
        self.log_to_loggers = True
        self._grads: list[torch.Tensor | None] = []
        self._plain_opt: Any = None
        self.resume_state: dict[str, Any] | None = None  # a native nntrain checkpoint to continue from
        self.epoch_offset = 0  # the learner's epoch at this Trainer's epoch 0 (a resumed native checkpoint)
        self._ckpt: dict[str, Any] | None = None  # this module's entry of a Lightning checkpoint being resumed
        self._train_iter: int | None = None  # last training batch run in the current epoch's training pass
        self._apply_at_open = False  # resumed inside an epoch: apply the saved states once it is reopened
        self.reopen_pending = False  # resumed: the next training epoch may start without on_train_epoch_start

    @property
    def epoch(self) -> int:
        """The learner's epoch: Lightning's `current_epoch` plus `epoch_offset`."""
        return self.epoch_offset + self.trainer.current_epoch

    # ----- set-up and tear-down ---------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Before any callback's `on_fit_start`: make the learner's state and dispatch current."""
        if stage != "fit":
            return
        learn = self.learn
        self.flow.reset()
        learn.engine = LightningEngine(self)
        learn.n_epochs = self.epoch_offset + self.trainer.max_epochs
        learn.epochs = range(learn.n_epochs)
        learn.fit_valid = bool(self.trainer.limit_val_batches)  # whether epochs have a validation pass
        # The in-step events go to exactly the subscribers bridged into this Trainer.
        from nntrain.adapters.callbacks import SubscriberCallback

        from nntrain.subscribers.tensorboard import TensorBoardS

        subs = [cb.sub for cb in self.trainer.callbacks if isinstance(cb, SubscriberCallback)]
        learn._handlers = event_handlers(subs)
        # TensorBoardS writes the epoch values itself, under the same tags as natively
        self.log_to_loggers = not any(isinstance(sub, TensorBoardS) for sub in subs)
        # Lightning sets the gradients to None when its run starts; the learner owns them
        # (MomentumLearner keeps mom * grad between fits), so they go back at on_train_start.
        self._grads = [p.grad for p in self.model.parameters()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The learner's optimizer (made now if the learner has none yet)."""
        learn = self.learn
        if learn.opt is None:
            learn.create_opt()
        opt = learn.opt
        if not isinstance(opt, torch.optim.Optimizer):
            opt = ForeignOptimizer(opt, getattr(opt, "params", learn.model.parameters()))
        self._plain_opt = learn.opt
        return opt

    def on_fit_start(self) -> None:
        """Resuming (after `before_fit`, before Lightning makes the loader's iterator): at an epoch's
        end, the saved subscriber states and RNG, as the native loop applies them before the next
        epoch; inside an epoch of a native checkpoint, the RNG the epoch's order was drawn from."""
        if self._ckpt is not None:
            self.learn.global_step = self._ckpt["global_step"]
            if self._ckpt["position"]["iter"] is None:
                self._apply_checkpoint_states()
            return
        state = self.resume_state
        if state is None:
            return
        if state["position"]["iter"] is None:
            apply_subscriber_states(self.learn, state)
            self.resume_state = None
        else:
            set_rng_state(state["epoch_rng"])

    def on_train_start(self) -> None:
        """Train mode, as the native loop sets it (Lightning keeps the modes it finds), Lightning's
        optimizer wrapper as `learn.opt` for the subscribers, and the gradients: Lightning set them
        to None when its run started, the learner owns them (MomentumLearner keeps mom * grad)."""
        self.model.train()
        self.learn.opt = self.optimizers()
        ckpt = self._ckpt
        if ckpt is not None:
            set_grads(self.model, ckpt["grads"])
            self.reopen_pending = True  # see open_resumed_epoch
            pos = ckpt["position"]
            if pos["iter"] is None:  # applied at on_fit_start
                self._ckpt = None
            elif self.epoch == pos["epoch"]:  # inside the epoch: applied when it is reopened
                self._check_resumable_loader(pos)
                self._apply_at_open = True
            else:  # after the epoch's last training batch, and Lightning went on to the next epoch
                self._finish_saved_epoch(pos["epoch"])
            return
        state = self.resume_state
        if state is None:
            set_grads(self.model, self._grads)
            return
        set_grads(self.model, state["grads"])
        if state["position"]["iter"] is not None:  # inside an epoch: run no step for the batches already trained
            self.flow.skip = ((state["position"]["epoch"], "train"), state["position"]["iter"] + 1)

    # ----- Lightning checkpoints ----------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add what Lightning does not keep: the gradients (`MomentumLearner` keeps `mom * grad`),
        the learner's `global_step` and epoch offset, the position in the epoch (`iter` None once
        the epoch's training pass is done), and every RNG state. Subscriber states go in through
        their callbacks, the weights and optimizer state through Lightning, a
        `ResumableDataLoader`'s position through Lightning's loop state."""
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in self.model.parameters()],
            "global_step": self.learn.global_step,
            "epoch_offset": self.epoch_offset,
            "position": {"epoch": self.epoch, "iter": self._train_iter},
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep this module's entry of the checkpoint being resumed; `on_fit_start`,
        `on_train_start` and `open_resumed_epoch` apply it.

        Raises:
            ValueError: the checkpoint was not written through `LearnerModule`.
        """
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise ValueError(
                "this Lightning checkpoint has no nntrain state (it was not written while training "
                "an nntrain LearnerModule): resume from a checkpoint of an nntrain fit, or load only "
                "the weights with learn.model.load_state_dict"
            )
        self._ckpt = state

    def _check_resumable_loader(self, pos: dict[str, Any]) -> None:
        """Lightning continues the checkpoint's epoch after its last trained batch; make sure the
        training loader continues there too (else the epoch would see the wrong batches)."""
        loader = self.trainer.train_dataloader
        skip = getattr(loader, "resumed_at", None)
        if skip != pos["iter"] + 1:
            note = "" if skip is None else f" (it would skip {skip} batches, not {pos['iter'] + 1})"
            raise loader_cannot_resume("the checkpoint", pos, loader, note)

    def _finish_saved_epoch(self, epoch: int) -> None:
        """Lightning resumes a checkpoint taken after an epoch's last training batch at the next
        epoch, skipping that epoch's validation pass: close the saved epoch's training pass
        (`before_epoch`, the saved states and RNG, `after_epoch`), as the native loop would."""
        if self.trainer.limit_val_batches:  # else there is no validation pass to miss
            warnings.warn(
                f"Lightning resumes this checkpoint (taken after the last training batch of epoch {epoch}) "
                f"at epoch {epoch + 1}, without running epoch {epoch}'s validation pass: that epoch has "
                "no validation metrics. Checkpoint at epoch ends (CheckpointS does) to keep them.",
                RuntimeWarning, stacklevel=2)
        callbacks = self._subscriber_callbacks()
        for cb in callbacks:
            cb.open_epoch(self.trainer, self, "train", epoch)
        self._apply_checkpoint_states()
        self._ckpt = None
        for cb in callbacks:
            cb.close_epoch(self.trainer, self, "train")

    def _subscriber_callbacks(self) -> list[Any]:
        from nntrain.adapters.callbacks import SubscriberCallback

        return [cb for cb in self.trainer.callbacks if isinstance(cb, SubscriberCallback)]

    def train_pass_closed(self) -> None:
        """The current epoch's training pass is over: a checkpoint now is at the epoch's end."""
        self._train_iter = None

    def _apply_checkpoint_states(self) -> None:
        """Give the subscribers their states from the checkpoint and restore its RNG."""
        for cb in self._subscriber_callbacks():
            cb.apply_loaded_state()
        set_rng_state(self._ckpt["rng"])

    def open_resumed_epoch(self) -> None:
        """Lightning continued a training epoch without `on_train_epoch_start` (it resumed inside
        it): fire `before_epoch` for every subscriber, then restore the checkpoint's subscriber
        states and RNG, as the native loop does before the next batch."""
        self.reopen_pending = False
        for cb in self._subscriber_callbacks():
            cb.open_epoch(self.trainer, self, "train")
        if self._apply_at_open:
            self._apply_at_open = False
            self._apply_checkpoint_states()
            self._ckpt = None

    def teardown(self, stage: str) -> None:
        """Give the learner back its own optimizer, engine and dispatch."""
        if stage != "fit":
            return
        learn = self.learn
        if self._plain_opt is not None:
            learn.opt = self._plain_opt
        learn.engine = NativeEngine()
        learn._handlers = event_handlers(learn.subs)

    def train_dataloader(self) -> Any:
        """The learner's training loader."""
        return self.learn.dls.train

    def val_dataloader(self) -> Any:
        """The learner's validation loader."""
        return self.learn.dls.valid

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward."""
        return self.model(*args, **kwargs)

    def on_train_epoch_start(self) -> None:
        """Remember the mode, to leave the model as a native fit would."""
        self.train_pass_closed()
        self.reopen_pending = False  # Lightning opened the epoch itself
        if self.train_enabled and not self.flow.fit_cancelled:
            self.flow.last_mode = "train"

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Resumed inside an epoch with no subscriber callback to reopen it: restore the states."""
        if self.reopen_pending:
            self.open_resumed_epoch()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Resuming a native checkpoint: after the last batch already trained, restore subscriber
        states and the RNG."""
        skip = self.flow.skip
        if skip is not None and self.resume_state is not None and batch_idx == skip[1] - 1:
            apply_subscriber_states(self.learn, self.resume_state)
            self.resume_state = None

    def on_validation_epoch_start(self) -> None:
        """Remember the mode, to leave the model as a native fit would."""
        if not self.trainer.sanity_checking:
            self.train_pass_closed()
        if not self.trainer.sanity_checking and not self.flow.fit_cancelled:
            self.flow.last_mode = "valid"

    def on_validation_model_zero_grad(self) -> None:
        """Keep gradients across validation: the learner owns them (MomentumLearner keeps mom * grad)."""

    def on_fit_end(self) -> None:
        """Leave the model in the mode of the last epoch, as a native fit does."""
        self.restore_mode()

    def restore_mode(self) -> None:
        """Put the model in the mode of the last epoch run (Lightning switches back to train)."""
        if self.flow.last_mode is not None:
            self.model.train(self.flow.last_mode == "train")

    # ----- steps ------------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Run the learner's step (predict, loss, backward, step, zero_grad) with its events."""
        if not self.train_enabled:
            return
        self._step((self.epoch, "train"), batch, batch_idx)
        self._train_iter = batch_idx  # the position a checkpoint records

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Run the learner's step in eval mode (predict, loss) with its events."""
        if self.trainer.sanity_checking:
            return
        self._step((self.epoch, "valid"), batch, batch_idx)

    def _step(self, epoch_key: tuple, batch: Any, batch_idx: int) -> None:
        batch_key = (epoch_key, batch_idx)
        if not self.flow.batch_live(epoch_key, batch_key) or self.flow.skipped(epoch_key, batch_idx):
            return
        if self.flow.current_batch != batch_key:  # no callback set it (and before_batch could not change it)
            self.flow.current_batch = batch_key
            self.learn.batch, self.learn.iter = batch, batch_idx
        try:
            self.learn.run_step()
        except CancelException as exc:
            self.cancel(exc, epoch_key, batch_key)

    def cancel(self, exc: CancelException, epoch_key: tuple | None, batch_key: tuple | None) -> None:
        """Honour a cancel raised in the given scope: mark it in the flow; a CancelFit also asks
        the Trainer to stop (`should_stop`)."""
        self.flow.cancel(exc, epoch_key, batch_key)
        if isinstance(exc, CancelFitException):
            self.trainer.should_stop = True
