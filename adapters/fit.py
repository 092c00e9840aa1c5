"""Entry points: `to_lightning` for your own Trainer, and `LightningRunner`, the runner behind
`learn.fit`, `learn.evaluate` and `learn.get_preds` with `engine="lightning"`."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from nntrain.adapters.callback import LearnerCallback
from nntrain.adapters.engine import refuse_callbacks
from nntrain.adapters.module import LearnerModule
from nntrain.adapters.quiet import asked_for, lightning_quiet
from nntrain.adapters.results import load_results
from nntrain.checkpoint import CheckpointError
from nntrain.devices import model_device
from nntrain.engines import collate_preds
from nntrain.events import Subscriber, declared, subscriber_engines
from nntrain.learner import Learner
from nntrain.logs import make_log_dir
from nntrain.optim import LR
from nntrain.resume import ResumePlan

__all__ = ["to_lightning", "LightningRunner", "trainer_defaults", "model_device", "UNSUPPORTED_TRAINER_OPTIONS"]

UNSUPPORTED_TRAINER_OPTIONS: dict[str, str] = {
    "max_epochs": "pass the number of epochs as fit(epochs, ...)",
    "ckpt_path": "pass the checkpoint as fit(..., resume=path) (a Lightning or a native one)",
}
"""Trainer options the bridge refuses (`gradient_clip_val` and `accumulate_grad_batches` run
as `GradClipS` / `GradAccumS`, see `take_trainer_recipes`)."""


def _bridgeable(subs: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
    """The subscribers that run under Lightning, and what the subscribers ask of an engine that
    does their job itself (`engine_needs()`: a device, a TensorBoard directory).

    Raises:
        ValueError: a subscriber that cannot run under Lightning and asks nothing of it.
    """
    kept, needs = [], {}
    for sub in subs:
        asked = declared(sub, "engine_needs")()
        needs.update(asked)
        if "lightning" in subscriber_engines(sub):
            kept.append(sub)
        elif not asked:
            raise ValueError(
                f"{type(sub).__name__} supports the engines {subscriber_engines(sub)} only; remove it from the "
                f"learner's subs or fit with engine='native'"
            )
    return kept, needs


def to_lightning(
    learn: Learner, subs: Sequence[Subscriber] = (), train: bool = True
) -> tuple[LearnerModule, list[LearnerCallback]]:
    """A LightningModule for `learn` and the one Callback that runs its subscribers (the
    learner's plus `subs`), for a Trainer you build yourself: `trainer.fit`, `validate`,
    `test` and `predict` then run the learner as natively.

    Add your own Lightning callbacks next to it; set `num_sanity_val_steps=0` to keep the
    random number stream the same as a native run. `trainer.fit(module, ckpt_path=...)` resumes
    from a checkpoint of such a fit exactly (inside an epoch, the training loader must be a
    `ResumableDataLoader`).
    """
    if not isinstance(learn.model, nn.Module):
        raise TypeError(f"learn.model must be a torch.nn.Module, got {type(learn.model).__name__}")
    kept, _ = _bridgeable([*learn.subs, *subs])
    module = LearnerModule(learn, train=train)
    return module, [LearnerCallback(module, kept)]


def trainer_defaults(device: torch.device) -> dict[str, Any]:
    """Trainer options that make a Lightning run match a native one: no logger, checkpoints,
    progress bar, summary or sanity validation, on `device`."""
    accelerator = {"cuda": "gpu", "mps": "mps"}.get(device.type, "cpu")
    devices: Any = [device.index or 0] if device.type == "cuda" else 1
    return dict(
        accelerator=accelerator,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _options(learn: Learner, needs: dict[str, Any], trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`trainer_defaults` for the learner, turned on where the user's callbacks need it, then the
    user's options."""
    from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ProgressBar

    options = trainer_defaults(needs.get("device") or model_device(learn.model))
    callbacks = list(trainer_kwargs.get("callbacks") or [])
    if any(isinstance(cb, Checkpoint) for cb in callbacks):
        options["enable_checkpointing"] = True
    if any(isinstance(cb, ProgressBar) for cb in callbacks):
        options["enable_progress_bar"] = True
    if "logger" not in trainer_kwargs:
        tb = _tensorboard_logger(needs)
        if tb is not None:
            options["logger"] = tb
        elif any(isinstance(cb, LearningRateMonitor) for cb in callbacks):
            options["logger"] = True  # Lightning's default logger
    options.update({k: v for k, v in trainer_kwargs.items() if k != "callbacks"})
    return options


class LightningRunner:
    """The Lightning engine's `nntrain.engines.Runner`: `learn.fit(engine="lightning")`,
    `learn.evaluate(..., engine="lightning")` and `learn.get_preds(..., engine="lightning")` run
    a `lightning.Trainer` over the learner's `LearnerModule` and `LearnerCallback`, with
    `trainer_defaults` overridden by the caller's Trainer options.

    With a `TensorBoardS` attached and no `logger` given, the Trainer gets a `TensorBoardLogger`
    at the same place, and `TensorBoardS` writes its run through it (one event file per run).
    Callbacks that need checkpointing, a progress bar or a logger get them turned on.
    Lightning's info lines (the accelerator banner, tips, "`Trainer.fit` stopped") and the
    third-party warnings users cannot act on are shown only with `verbose=True`, also in the
    processes `ddp_spawn` starts (`nntrain.adapters.quiet`); what the options ask for (a model
    summary, a profiler's report, a progress bar) is always shown. `fit` returns None, as the
    native engine does; the Trainer of the latest fit is `learn.trainer`.

    A resume names a checkpoint of either format: a Lightning checkpoint goes to
    `trainer.fit(ckpt_path=...)` (Lightning restores weights, optimizer, loops and a
    `ResumableDataLoader`'s position; the learner state comes from its "nntrain" entry); a native
    one is loaded into the learner and the Trainer's epoch 0 is the checkpoint's epoch (inside it,
    the batches already trained are fetched and run no step and fire no event) or the next one.
    """

    def __init__(self) -> None:
        self.resume_view: tuple[Any, str] | None = None  # this process's resume, compared across DDP ranks

    def check(self, learn: Learner, subs: list[Any], options: dict[str, Any]) -> None:
        """Refuse Trainer options, callbacks and subscribers the bridge cannot honour.

        Raises:
            ValueError: naming the option, callback or subscriber and what to use instead.
        """
        for option, why in UNSUPPORTED_TRAINER_OPTIONS.items():
            if option in options:
                raise ValueError(
                    f"Trainer option {option}={options[option]!r} is not supported by the nntrain bridge: {why}"
                )
        if not isinstance(learn.model, nn.Module):
            raise TypeError(f"learn.model must be a torch.nn.Module, got {type(learn.model).__name__}")
        refuse_callbacks(options.get("callbacks") or [])  # some act in their own setup, before ours
        _bridgeable(subs)

    def restore(self, learn: Learner, resume: Any, epochs: int, train: bool) -> ResumePlan | None:
        """The resume plan for `resume`. In a process of a multi-process launch (torchrun, or a
        rank `strategy="ddp"` started), a checkpoint this process cannot find or read is not
        raised here, where the other ranks would wait for it, but at the Trainer's setup, on every
        rank together (see `LearnerModule.agree_on_resume`)."""
        try:
            plan = ResumePlan.restore(learn, resume, epochs, train, lightning_ok=True)
        except (CheckpointError, OSError) as exc:
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                raise
            self.resume_view = (("failed", str(exc)), f"cannot resume {str(resume)!r}: {exc}")
            return None
        if plan is None:
            self.resume_view = (("none",), f"no checkpoint found for resume={str(resume)!r}")
            return None
        if plan.lightning and plan.inside_epoch and not hasattr(learn.dls.train, "load_state_dict"):
            from nntrain.adapters.module import loader_cannot_resume

            raise loader_cannot_resume(
                f"checkpoint {plan.path}", {"epoch": plan.epoch, "iter": plan.iter}, learn.dls.train
            )
        self.resume_view = (plan.key(), plan.describe())
        return plan

    def fit(
        self,
        learn: Learner,
        epochs: int,
        plan: ResumePlan | None,
        train: bool,
        valid: bool,
        lr: LR | None,
        options: dict[str, Any],
    ) -> None:
        """Run `trainer.fit` for the epochs left; the Trainer (its `callback_metrics`, `logger` and
        checkpoint paths) is `learn.trainer` afterwards."""
        options = dict(options)
        verbose = bool(options.pop("verbose", False))
        shown = asked_for(options)
        bridge_logger = "logger" not in options and "log_every_n_steps" not in options
        _, needs = _bridgeable(learn.subs)
        module, callbacks = to_lightning(learn, subs=(), train=train)
        module.fit_lr = lr
        module.resume_view = self.resume_view
        ckpt_path, offset = None, 0
        if plan is not None:
            if plan.lightning:
                ckpt_path, offset = plan.path, plan.epoch_offset  # Lightning loads it; on_load_checkpoint reads it
            else:
                offset = module.epoch_offset = plan.start_epoch
        trainer_options = _options(learn, needs, options)
        if not valid:
            trainer_options["limit_val_batches"] = 0
        if not train:  # Lightning cannot skip training and still validate; fetch one batch, step none
            trainer_options["limit_train_batches"] = 1
        user_callbacks = list(options.get("callbacks") or [])
        if ckpt_path is None:
            refuse_unasked_resume(user_callbacks)
        module.quiet_workers = None if verbose else (shown, bridge_logger)
        with lightning_quiet(verbose, shown, bridge_logger):
            trainer = L.Trainer(
                max_epochs=max(epochs - offset, 0), callbacks=[*callbacks, *user_callbacks], **trainer_options
            )
        learn.trainer = trainer
        with _spawned_results(trainer, module), lightning_quiet(verbose, shown, bridge_logger):
            trainer.fit(module, ckpt_path=ckpt_path, weights_only=True if ckpt_path is not None else None)

    def evaluate(self, learn: Learner, dl: Any, mode: str, options: dict[str, Any]) -> None:
        """`trainer.validate` (mode "valid") or `trainer.test` over `dl`."""
        trainer, module = _eval_trainer(learn, options)
        with lightning_quiet(False, asked_for(options)):
            if mode == "valid":
                trainer.validate(module, dataloaders=dl, verbose=False)
            else:
                trainer.test(module, dataloaders=dl, verbose=False)

    def get_preds(self, learn: Learner, dl: Any, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`trainer.predict` over `dl`, concatenated as natively."""
        trainer, module = _eval_trainer(learn, options)
        with lightning_quiet(False, asked_for(options)):
            outputs = trainer.predict(module, dataloaders=dl)
        return collate_preds(outputs or [])  # type: ignore[arg-type]  # one loader: one flat list


def _eval_trainer(learn: Learner, options: dict[str, Any]) -> tuple[L.Trainer, LearnerModule]:
    _, needs = _bridgeable(learn.subs)
    module, callbacks = to_lightning(learn)
    trainer_options = _options(learn, needs, options)
    user_callbacks = list(options.get("callbacks") or [])
    with lightning_quiet(False):
        return L.Trainer(callbacks=[*callbacks, *user_callbacks], **trainer_options), module


def refuse_unasked_resume(callbacks: Sequence[Any]) -> None:
    """Refuse a fit that asked for no resume while an `OnExceptionCheckpoint` file of a failed run
    is there: Lightning would resume from it unasked.

    Raises:
        ValueError: naming the file and the two ways on.
    """
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    for cb in callbacks:
        if isinstance(cb, OnExceptionCheckpoint) and os.path.exists(cb.ckpt_path):
            raise ValueError(
                f"{cb.ckpt_path} is there, written by OnExceptionCheckpoint when a run failed, and Lightning would "
                f"resume from it although this fit asked for no resume: continue that run with "
                f"fit(..., resume={cb.ckpt_path!r}), or delete the file to start afresh"
            )


def _tensorboard_logger(needs: dict[str, Any]) -> Any:
    """A TensorBoardLogger at the place a subscriber asked for (`tensorboard_dir`, same layout:
    `dir/name/version_N`), so it writes its run through the Trainer's logger; else None."""
    if "tensorboard_dir" not in needs:
        return None
    from lightning.pytorch.loggers import TensorBoardLogger

    make_log_dir(needs["tensorboard_dir"])  # an unusable directory: a clear error, before training
    return TensorBoardLogger(
        save_dir=str(needs["tensorboard_dir"]), name=needs.get("tensorboard_name") or "", default_hp_metric=False
    )


@contextlib.contextmanager
def _spawned_results(trainer: L.Trainer, module: LearnerModule) -> Iterator[None]:
    """When Lightning runs the fit in processes it starts (`ddp_spawn`, `ddp_fork`), rank 0 writes
    what the fit leaves in the learner to a temporary file and the caller's learner loads it,
    as a `ddp` run leaves it on rank 0 (Lightning itself brings back only the weights)."""
    from lightning.pytorch.strategies.launchers.multiprocessing import (
        _MultiProcessingLauncher,
    )

    if not isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="nntrain-spawn-") as tmp:
        module.results_path = os.path.join(tmp, "results.pt")
        try:
            yield
        finally:
            path = module.results_path
            module.results_path = None
        if os.path.exists(path):
            load_results(module.learn, path)
