"""`SubscriberCallback`: one nntrain Subscriber as a Lightning Callback.

`HOOK_TABLE` is the mapping from Lightning hooks to nntrain events; the README shows it.
Scope keys and cancellation are shared through the `LearnerModule`'s `Flow`, so a cancel
raised by one subscriber silences the rest of its scope for every subscriber, as on the
native engine.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from nntrain.learner import (
    CancelBatchException,
    CancelEpochException,
    CancelException,
    CancelFitException,
    Subscriber,
    _name_source,
    event_handlers,
)

__all__ = ["HOOK_TABLE", "SubscriberCallback"]

HOOK_TABLE: tuple[tuple[str, str], ...] = (
    ("setup('fit')", "(no event) learner state, engine and dispatch made current"),
    ("on_fit_start", "before_fit"),
    ("on_train_epoch_start", "before_epoch (train)"),
    ("on_train_batch_start", "before_batch (first resumed batch inside an epoch: before_epoch, the saved states, then before_batch)"),
    ("training_step", "after_predict, after_loss, after_backward, after_step"),
    ("on_train_batch_end", "after_batch, cleanup_batch"),
    ("on_validation_epoch_start", "after_epoch + cleanup_epoch of the train epoch, then before_epoch (valid)"),
    ("on_validation_batch_start", "before_batch"),
    ("validation_step", "after_predict, after_loss"),
    ("on_validation_batch_end", "after_batch, cleanup_batch"),
    ("on_validation_epoch_end", "after_epoch, cleanup_epoch (valid)"),
    ("on_train_epoch_end", "after_epoch, cleanup_epoch (train) when no validation ran"),
    ("on_fit_end", "after_fit, cleanup_fit"),
    ("on_exception", "cleanup_batch, cleanup_epoch, cleanup_fit of the scopes still open"),
)
"""Lightning hook -> nntrain events. Lightning runs validation inside the training epoch, before
`on_train_epoch_end`; the train epoch's `after_epoch` fires when validation starts, so the order
of events is the native one."""

_ALLOWED: dict[str, tuple[type[CancelException], ...]] = {
    "fit": (CancelFitException,),
    "epoch": (CancelFitException, CancelEpochException),
    "batch": (CancelFitException, CancelEpochException, CancelBatchException),
}


class SubscriberCallback(L.Callback):
    """Runs one `Subscriber` under a Lightning Trainer, with the learner as its argument.

    Needs a `LearnerModule` as the Trainer's module. Its checkpoint state is the subscriber's
    `state_dict()`.
    """

    def __init__(self, sub: Subscriber, index: int = 0) -> None:
        self.sub = sub
        self.index = index
        table = event_handlers([sub])  # also rejects handler names that are not events
        self._h = {event: (hs[0] if hs else None) for event, hs in table.items()}
        self._open: dict[str, tuple] = {}
        self._loaded: dict[str, Any] | None = None  # state from a checkpoint, not yet applied

    @property
    def state_key(self) -> str:
        """Unique per subscriber, so several bridged subscribers can keep state in a checkpoint."""
        return self._generate_state_key(sub=type(self.sub).__qualname__, index=self.index)

    def state_dict(self) -> dict[str, Any]:
        """The subscriber's state."""
        return self.sub.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the subscriber's state from a checkpoint; the `LearnerModule` gives it to the
        subscriber where the resumed fit reaches the checkpoint's position (after `before_fit`,
        and `before_epoch` when resuming inside an epoch), as the native loop does."""
        self._loaded = state_dict

    def apply_loaded_state(self) -> None:
        """Give the subscriber the state `load_state_dict` kept, if any."""
        if self._loaded is not None:
            self.sub.load_state_dict(self._loaded)
            self._loaded = None

    # ----- dispatch ----------------------------------------------------------------------------

    def _fire(self, module: Any, event: str, scope: str, epoch_key: tuple | None = None,
              batch_key: tuple | None = None) -> None:
        handler = self._h[event]
        if handler is None:
            return
        try:
            handler(module.learn)
        except _ALLOWED[scope] as exc:
            module.cancel(exc, epoch_key, batch_key)
        except Exception as exc:
            _name_source(exc, handler, event)
            raise

    def open_epoch(self, trainer: L.Trainer, module: Any, mode: str, epoch: int | None = None) -> None:
        """Fire `before_epoch` for the `mode` pass of `epoch` (default: the current one), and make
        the learner's epoch and loader current."""
        learn, flow = module.learn, module.flow
        epoch = module.epoch if epoch is None else epoch
        learn.epoch = epoch
        learn.dl = trainer.train_dataloader if mode == "train" else trainer.val_dataloaders
        if "fit" not in self._open or flow.fit_cancelled:
            return
        key = (epoch, mode)
        self._open["epoch"] = key
        if flow.epoch_live(key):
            self._fire(module, "before_epoch", "epoch", key)

    def close_epoch(self, trainer: L.Trainer, module: Any, mode: str) -> None:
        """Fire `after_epoch` (unless cancelled) and `cleanup_epoch` for the open `mode` pass."""
        if mode == "train":
            module.train_pass_closed()
        key = self._open.get("epoch")
        if key is None or key[1] != mode:
            return
        learn = module.learn
        was_training = learn.model.training
        learn.model.train(mode == "train")  # Lightning may already have switched to eval
        learn.epoch = key[0]
        if mode == "train":
            learn.dl = trainer.train_dataloader
        try:
            if module.flow.epoch_live(key):
                self._fire(module, "after_epoch", "epoch", key)
                self._log_metrics(module, mode)
            del self._open["epoch"]
            self._fire(module, "cleanup_epoch", "epoch", key)
        finally:
            learn.model.train(was_training)

    def _open_batch(self, trainer: L.Trainer, module: Any, mode: str, batch: Any, batch_idx: int) -> None:
        if trainer.sanity_checking:
            return
        ekey = (module.epoch, mode)
        flow = module.flow
        if self._open.get("epoch") != ekey or not flow.epoch_live(ekey) or flow.skipped(ekey, batch_idx):
            return
        bkey = (ekey, batch_idx)
        if flow.current_batch != bkey:  # the first callback puts the batch in the learner
            flow.current_batch = bkey
            module.learn.batch, module.learn.iter = batch, batch_idx
        self._open["batch"] = bkey
        if flow.batch_live(ekey, bkey):
            self._fire(module, "before_batch", "batch", ekey, bkey)

    def _close_batch(self, module: Any) -> None:
        bkey = self._open.get("batch")
        if bkey is None:
            return
        if module.flow.batch_live(bkey[0], bkey):
            self._fire(module, "after_batch", "batch", bkey[0], bkey)
        del self._open["batch"]
        self._fire(module, "cleanup_batch", "batch", bkey[0], bkey)

    def _log_metrics(self, module: Any, mode: str) -> None:
        """Log a MetricsS row through Lightning as `<mode>/<name>` (for EarlyStopping, loggers).

        With a TensorBoardS attached the values reach `callback_metrics` only: TensorBoardS
        writes them to the run itself, under the tags it uses natively."""
        row = getattr(self.sub, "last", None)
        if not isinstance(row, dict) or row.get("mode") != mode or not hasattr(self.sub, "history"):
            return
        sync = module.trainer.world_size > 1  # values are already global; this only silences a warning
        for name, value in row.items():
            if name not in ("epoch", "mode") and isinstance(value, (int, float)):
                module.log(f"{mode}/{name}", float(value), on_step=False, on_epoch=True, sync_dist=sync,
                           logger=module.log_to_loggers)

    # ----- Lightning hooks (see HOOK_TABLE) ----------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._open = {"fit": ("fit",)}
        if not pl_module.flow.fit_cancelled:
            self._fire(pl_module, "before_fit", "fit")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        if pl_module.train_enabled:
            self.open_epoch(trainer, pl_module, "train")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:  # noqa: D102
        if pl_module.reopen_pending:  # resumed inside an epoch: Lightning skipped on_train_epoch_start
            pl_module.open_resumed_epoch()
        self._open_batch(trainer, pl_module, "train", batch, batch_idx)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # noqa: D102
        self._close_batch(pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        if trainer.sanity_checking:
            return
        self.close_epoch(trainer, pl_module, "train")
        self.open_epoch(trainer, pl_module, "valid")

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:  # noqa: D102
        self._open_batch(trainer, pl_module, "valid", batch, batch_idx)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # noqa: D102
        self._close_batch(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        if not trainer.sanity_checking:
            self.close_epoch(trainer, pl_module, "valid")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self.close_epoch(trainer, pl_module, "train")

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        if "fit" not in self._open:
            return
        pl_module.restore_mode()
        if not pl_module.flow.fit_cancelled:
            self._fire(pl_module, "after_fit", "fit")
        del self._open["fit"]
        self._fire(pl_module, "cleanup_fit", "fit")

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:  # noqa: D102
        learn = pl_module.learn
        for scope in ("batch", "epoch", "fit"):
            if self._open.pop(scope, None) is not None and self._h[f"cleanup_{scope}"] is not None:
                self._h[f"cleanup_{scope}"](learn)
