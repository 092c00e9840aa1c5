"""`LearnerCallback`: the one Lightning Callback that drives a learner's `Dispatcher`.

`HOOK_TABLE` is the whole mapping from Lightning hooks to nntrain scopes; the callback's hook
methods only look their row up. The docs' Lightning page shows the table this module generates (a test checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L

from nntrain.adapters.binding import match_optimizer_state
from nntrain.checkpoint_state import set_grads
from nntrain.checks import check_batch_structure
from nntrain.optim import set_lr
from nntrain.rng import set_rng_state

if TYPE_CHECKING:
    from nntrain.adapters.module import LearnerModule

__all__ = ["HOOK_TABLE", "STEP_TABLE", "LearnerCallback"]

Action = tuple[str, ...]

HOOK_TABLE: dict[str, tuple[Action, ...]] = {
    "setup": (("setup",),),
    "on_fit_start": (("open", "fit"),),
    "on_train_start": (("train_start",),),
    "on_train_epoch_start": (("open", "epoch", "train"),),
    "on_train_batch_start": (("open", "batch", "train"),),
    "on_train_batch_end": (("close", "batch", "train"),),
    "on_validation_start": (("open_eval", "fit"),),
    "on_validation_epoch_start": (("close", "epoch", "train"), ("open", "epoch", "valid")),
    "on_validation_batch_start": (("open", "batch", "valid"),),
    "on_validation_batch_end": (("close", "batch", "valid"),),
    "on_validation_epoch_end": (("close", "epoch", "valid"),),
    "on_validation_end": (("close_eval", "fit"),),
    "on_train_epoch_end": (("close", "epoch", "train"),),
    "on_fit_end": (("close", "fit"),),
    "on_test_start": (("open_eval", "fit"),),
    "on_test_epoch_start": (("open", "epoch", "test"),),
    "on_test_batch_start": (("open", "batch", "test"),),
    "on_test_batch_end": (("close", "batch", "test"),),
    "on_test_epoch_end": (("close", "epoch", "test"),),
    "on_test_end": (("close_eval", "fit"),),
    "on_exception": (("abort",),),
    "teardown": (("teardown",),),
}
"""Lightning hook -> what it drives, in order. `open`/`close` a scope (fit, epoch of a mode,
batch); `open_eval`/`close_eval` the fit scope of `trainer.validate` / `trainer.test` (inside
`trainer.fit` validation is part of the fit); `setup` binds the learner to the Trainer and
refuses what cannot give native numbers; `train_start` hands the learner Lightning's optimizer and
the gradients (and lines a resumed epoch up with Lightning's); `abort` keeps the state an
`OnExceptionCheckpoint` saves, fires the cleanups of the open scopes and has the learner given
back once every callback has handled the exception; `teardown` gives the learner back. The
scopes apply a resume plan's states themselves (see `nntrain.dispatch`).
Lightning runs validation inside the training epoch, before `on_train_epoch_end`: the training
pass closes when validation starts, so the order of events is the native one."""

STEP_TABLE: dict[str, str] = {
    "training_step": "after_predict, after_loss, before_backward, after_backward, before_step, after_step "
    "(learn.run_step)",
    "validation_step": "after_predict, after_loss",
    "test_step": "after_predict, after_loss",
    "predict_step": "(no event) learn.predict_batch(): (preds, targets)",
}
"""The `LearnerModule` steps and the events they fire."""

_SCOPE_EVENTS = {
    "fit": "before_fit / after_fit, cleanup_fit",
    "epoch": "before_epoch / after_epoch, cleanup_epoch",
    "batch": "before_batch / after_batch, cleanup_batch",
}


def hook_table_markdown() -> str:
    """The docs' table of Lightning hooks and the nntrain events they fire."""
    lines = ["| Lightning hook | drives |", "|---|---|"]
    for hook, actions in HOOK_TABLE.items():
        lines.append(f"| `{hook}` | " + "; ".join(" ".join(a) for a in actions) + " |")
    for step, events in STEP_TABLE.items():
        lines.append(f"| `{step}` | {events} |")
    return "\n".join(lines)


class LearnerCallback(L.Callback):
    """Runs a learner's subscribers under a Lightning Trainer: each hook drives the learner's
    `Dispatcher` as `HOOK_TABLE` says. Needs the Trainer's module to be this learner's
    `LearnerModule` (make both with `to_lightning`). The learner's loop position is set only
    through the dispatcher's scopes (`open_fit`, `open_epoch`, `open_batch`)."""

    def __init__(self, module: LearnerModule, subs: list[Any]) -> None:
        self.module = module
        self.subs = list(subs)
        self._table = {
            hook: tuple((getattr(self, f"_{a[0]}"), a[1:]) for a in actions) for hook, actions in HOOK_TABLE.items()
        }
        self._saved: dict[str, Any] = {}  # what `give_back` restores (empty: not bound)
        self._exception: Any = None  # an ExceptionState while an OnExceptionCheckpoint may save
        self._reopen = False  # resumed inside an epoch: Lightning starts it without on_train_epoch_start
        self._skip = 0  # a native plan inside an epoch: the first batches were trained before the checkpoint

    @property
    def state_key(self) -> str:
        """One per learner callback."""
        return "nntrain.LearnerCallback"

    def _drive(self, hook: str, trainer: L.Trainer, *args: Any) -> None:
        if trainer.sanity_checking:
            return
        for action, params in self._table[hook]:
            action(trainer, *params, *args)

    # ----- Lightning hooks: each looks its row up in HOOK_TABLE -----------------------------------

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:  # noqa: D102
        self._drive("setup", trainer, stage)

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:  # noqa: D102
        self._drive("teardown", trainer, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_fit_start", trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_train_start", trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_train_epoch_start", trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._drive("on_train_batch_start", trainer, batch, batch_idx)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._drive("on_train_batch_end", trainer, batch, batch_idx)

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_validation_start", trainer)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_validation_epoch_start", trainer)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:  # noqa: D102
        self._drive("on_validation_batch_start", trainer, batch, batch_idx)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:  # noqa: D102
        self._drive("on_validation_batch_end", trainer, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_validation_epoch_end", trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_validation_end", trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_train_epoch_end", trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_fit_end", trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_test_start", trainer)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_test_epoch_start", trainer)

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:  # noqa: D102
        self._drive("on_test_batch_start", trainer, batch, batch_idx)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:  # noqa: D102
        self._drive("on_test_batch_end", trainer, batch, batch_idx)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_test_epoch_end", trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:  # noqa: D102
        self._drive("on_test_end", trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:  # noqa: D102
        self._table["on_exception"][0][0](trainer, exception)

    # ----- actions ---------------------------------------------------------------------------------

    def _setup(self, trainer: L.Trainer, stage: str) -> None:
        """Bind the learner to this Trainer (`nntrain.adapters.binding.bind`), or refuse what the
        bridge cannot run with native numbers, before anything runs."""
        from nntrain.adapters.binding import bind
        from nntrain.adapters.engine import refuse_unsupported
        from nntrain.adapters.interrupt import ExceptionState, has_exception_checkpoint

        module = self.module
        if trainer.lightning_module is not module:
            raise ValueError(
                "this LearnerCallback belongs to another LearnerModule: make both with "
                "nntrain.adapters.to_lightning(learn) and give them to one Trainer"
            )
        refuse_unsupported(trainer, stage)
        self._saved = bind(module, trainer, self.subs, stage)
        self._reopen, self._skip = False, 0
        self._lrs: list[float] | None = None  # the lrs a resume set before Lightning restores its optimizer
        self._exception = ExceptionState() if stage == "fit" and has_exception_checkpoint(trainer) else None
        module.exception_state = None
        if stage == "fit" and trainer.world_size > 1:
            module.agree_on_resume()

    def give_back(self, trainer: L.Trainer, stage: str) -> None:
        """Give the learner back (`nntrain.adapters.binding.give_back`), once per run."""
        from nntrain.adapters.binding import give_back

        saved, self._saved = self._saved, {}
        if saved:
            give_back(self.module, trainer, saved, stage)

    def _teardown(self, trainer: L.Trainer, stage: str) -> None:
        self.give_back(trainer, stage)

    def _open(
        self, trainer: L.Trainer, scope: str, mode: str | None = None, batch: Any = None, batch_idx: int = 0
    ) -> None:
        # HOOK_TABLE gives every batch and epoch row its mode
        if scope == "batch":
            self._open_batch(trainer, mode, batch, batch_idx)  # type: ignore[arg-type]
        elif scope == "epoch":
            self._open_epoch(trainer, mode)  # type: ignore[arg-type]
        elif self.module.learn.dispatch.top is None:  # else the fit scope is open already
            self._open_fit(trainer)

    def _open_fit(self, trainer: L.Trainer) -> None:
        """Open the fit scope: `trainer.fit`'s epochs (after a resume's offset) and validation,
        or the one pass of `trainer.validate` / `test`."""
        module, learn = self.module, self.module.learn
        dispatch = learn.dispatch
        if trainer.state.fn != "fit":  # before_fit sees the mode the learner had (Lightning switched to eval)
            was_training = learn.model.training
            learn.model.train(self._saved.get("training", was_training))
            try:
                dispatch.open_fit(1, True)
            finally:
                learn.model.train(was_training)
            return
        plan = learn.resume_plan
        if plan is not None:
            learn.global_step = plan.global_step
            dispatch.resume = plan
        dispatch.open_fit(
            module.epoch_offset + trainer.max_epochs,  # type: ignore[operator]
            bool(trainer.limit_val_batches),
            plan.start_epoch if plan is not None else 0,
        )
        learn.model.train()  # after before_fit (which sees the mode the last pass left, as natively),
        # before Lightning looks for modules in eval mode
        if plan is not None and plan.lightning and not plan.inside_epoch and module.fit_lr is not None:
            self._lrs = [group["lr"] for group in learn.opt.param_groups]  # fit's lr, or a schedule's from it
        if plan is not None and plan.inside_epoch and not plan.lightning:
            set_rng_state(plan.epoch_rng)  # the resumed epoch's order, before Lightning makes the loader's iterator

    def _open_batch(self, trainer: L.Trainer, mode: str, batch: Any, batch_idx: int) -> None:
        learn = self.module.learn
        if mode == "train":
            if self._reopen:
                self._open_epoch(trainer, "train")  # Lightning continued a resumed epoch without its start hook
            if batch_idx < self._skip:  # trained before the checkpoint: no event, no step
                return
        if learn.dispatch.top != "epoch":  # its pass did not open (train=False) or was cancelled
            return
        try:
            learn.dispatch.open_batch(batch_idx, batch)
        except Exception as exc:
            check_batch_structure(exc, batch, mode)
            raise

    def _open_epoch(self, trainer: L.Trainer, mode: str, epoch: int | None = None) -> None:
        """Open the `mode` pass of `epoch` (default: the Trainer's, or 0 outside a fit)."""
        learn = self.module.learn
        dispatch = learn.dispatch
        if mode == "train":
            self._reopen = False
            self.module.train_iter = None
            if self._exception is not None:
                self._exception.pass_opened()
            if not self.module.train_enabled:
                return
        if dispatch.top != "fit" or dispatch.cancelled is not None:
            return
        if epoch is None:
            epoch = self.module.epoch if mode == "train" or trainer.state.fn == "fit" else 0
        dl = {"train": trainer.train_dataloader, "valid": trainer.val_dataloaders, "test": trainer.test_dataloaders}[
            mode
        ]
        n = (
            trainer.num_training_batches
            if mode == "train"
            else (trainer.num_val_batches if mode == "valid" else trainer.num_test_batches)
        )
        n = n[0] if isinstance(n, list) else n
        dispatch.open_epoch(mode, epoch, dl, int(n) if n != float("inf") else None)

    def _close(
        self, trainer: L.Trainer, scope: str, mode: str | None = None, batch: Any = None, batch_idx: int = 0
    ) -> None:
        learn = self.module.learn
        dispatch = learn.dispatch
        if scope == "batch":
            if dispatch.top != "batch":
                return
            if mode == "train":
                self.module.train_iter = batch_idx  # the position a checkpoint records
            try:
                dispatch.close_scope("batch")
            except Exception as exc:
                check_batch_structure(exc, batch, mode)  # type: ignore[arg-type]  # a batch row's mode
                raise
            if mode == "train" and self._exception is not None:
                self._exception.batch_ended(learn, batch_idx)
            return
        if scope == "epoch":
            if mode == "train":
                self.module.train_iter = None
                self._skip = 0  # the resumed epoch's replayed batches are behind us
            if dispatch.top != "epoch" or learn.mode != mode:
                return
            was_training = learn.model.training
            learn.model.train(mode == "train")  # Lightning may already have switched to eval
            try:
                dispatch.close_scope("epoch")
            finally:
                learn.model.train(was_training)
            return
        while dispatch.top is not None and dispatch.top != "fit":  # a stop left scopes open
            dispatch.close_scope(dispatch.top, failed=True)
        self.module.restore_mode()
        dispatch.close_scope("fit")

    def _open_eval(self, trainer: L.Trainer, scope: str) -> None:
        if trainer.state.fn != "fit":
            self._open(trainer, scope)

    def _close_eval(self, trainer: L.Trainer, scope: str) -> None:
        if trainer.state.fn != "fit":
            self._close(trainer, scope)

    def _abort(self, trainer: L.Trainer, exception: BaseException) -> None:
        """Fire the open scopes' cleanups, having kept the state an `OnExceptionCheckpoint` saves
        next; the learner is given back after every callback's `on_exception` (or at once, with
        a clear error, for a native checkpoint given as `ckpt_path`)."""
        from nntrain.adapters.binding import GiveBackOnException
        from nntrain.adapters.interrupt import native_ckpt_path_error

        module = self.module
        if self._exception is not None and self._saved:
            module.exception_state = self._exception.state_at_exception(module.learn)
        module.learn.dispatch.abort()
        error = native_ckpt_path_error(trainer, exception)
        if error is not None:
            self.give_back(trainer, "fit")
            raise error from exception
        trainer.callbacks.append(GiveBackOnException(self))  # type: ignore[attr-defined]  # runs last in this round of on_exception

    # ----- resuming ---------------------------------------------------------------------------------

    def _train_start(self, trainer: L.Trainer) -> None:
        """Train mode, Lightning's optimizer wrapper as `learn.opt`, and the learner's gradients
        (Lightning set them to None; `MomentumLearner` keeps `mom * grad`); a resumed epoch lined
        up with the batches Lightning replays or skips."""
        module = self.module
        learn = module.learn
        if module.lr_schedulers():
            raise ValueError(
                "LR schedulers from configure_optimizers are not stepped by the nntrain bridge "
                "(its optimization is manual): attach nntrain.SchedulerS(lambda opt: <scheduler>), "
                "which steps it on both engines"
            )
        learn.model.train()
        learn.opt = module.optimizers()
        match_optimizer_state(module.plain_opt)  # a *-true precision converted the parameters
        plan = learn.resume_plan
        if module.fit_lr is not None and plan is not None and plan.lightning:  # Lightning restored the saved lr
            if self._lrs is not None:  # the fit's lr, as the resumed states left it (a schedule's)
                for group, lr in zip(learn.opt.param_groups, self._lrs):
                    group["lr"] = lr
            else:  # the resumed states come at the first batch, over the fit's lr
                set_lr(learn.opt, module.fit_lr)
        if plan is None:
            set_grads(learn.model, self._saved["grads"])
            return
        set_grads(learn.model, plan.grads)
        # Lightning may continue a resumed epoch without on_train_epoch_start: reopen it at its first batch
        self._reopen = plan.lightning
        if not plan.inside_epoch:
            return
        if not plan.lightning:
            self._skip = plan.iter + 1  # Lightning replays the epoch's batches; the first ones run no step
        elif module.epoch == plan.epoch:
            module.check_resumable_loader(plan)
        else:
            self._finish_saved_epoch(trainer, plan)
            self._reopen = True  # the next epoch starts without on_train_epoch_start too

    def _finish_saved_epoch(self, trainer: L.Trainer, plan: Any) -> None:
        """Lightning resumes a checkpoint taken after an epoch's last training batch at the next
        epoch, without that epoch's validation pass: close the saved training pass (`before_epoch`,
        the saved states and RNG, `after_epoch`), as the native loop would."""
        import warnings

        if trainer.limit_val_batches:
            warnings.warn(
                f"Lightning resumes this checkpoint (taken after the last training batch of epoch {plan.epoch}) "
                f"at epoch {plan.epoch + 1}, without running epoch {plan.epoch}'s validation pass: that epoch has "
                "no validation metrics. Checkpoint at epoch ends (CheckpointS does) to keep them.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._open_epoch(trainer, "train", epoch=plan.epoch)
        self._close(trainer, "epoch", "train")
