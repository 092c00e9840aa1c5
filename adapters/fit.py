"""Entry points: `to_lightning` for your own Trainer, `fit_lightning` behind `learn.fit(engine="lightning")`,
`evaluate_lightning` and `predict_lightning` behind `learn.evaluate` / `learn.get_preds(engine="lightning")`."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from nntrain.adapters.callback import LearnerCallback, load_results
from nntrain.adapters.engine import refuse_callbacks
from nntrain.adapters.module import LearnerModule
from nntrain.checkpoint import CheckpointError, ResumePlan
from nntrain.checks import _empty_valid, announce_resume
from nntrain.learner import Learner, Subscriber, collate_preds, model_device, set_lr, subscriber_engines
from nntrain.logs import quiet_loggers

__all__ = ["to_lightning", "fit_lightning", "evaluate_lightning", "predict_lightning", "trainer_defaults",
           "model_device", "UNSUPPORTED_TRAINER_OPTIONS"]

UNSUPPORTED_TRAINER_OPTIONS: dict[str, str] = {
    "max_epochs": "pass the number of epochs as fit(epochs, ...)",
}
"""Trainer options `fit_lightning` refuses (`gradient_clip_val` and `accumulate_grad_batches` run
as `GradClipS` / `GradAccumS`, see `take_trainer_recipes`)."""


def _bridgeable(subs: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
    """The subscribers that run under Lightning, and what the subscribers ask of an engine that
    does their job itself (`engine_needs()`: a device, a TensorBoard directory).

    Raises:
        ValueError: a subscriber that cannot run under Lightning and asks nothing of it.
    """
    kept, needs = [], {}
    for sub in subs:
        engine_needs = getattr(sub, "engine_needs", None)
        if callable(engine_needs):
            needs.update(engine_needs())
        if "lightning" in subscriber_engines(sub):
            kept.append(sub)
        elif not callable(engine_needs):
            raise ValueError(
                f"{type(sub).__name__} supports the engines {subscriber_engines(sub)} only; remove it from the "
                f"learner's subs or fit with engine='native'"
            )
    return kept, needs


def to_lightning(learn: Learner, subs: Sequence[Subscriber] = (), train: bool = True
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


def fit_lightning(learn: Learner, epochs: int, train: bool = True, valid: bool = True,
                  subs: Sequence[Subscriber] = (), lr: float | None = None, resume: Any = None,
                  **trainer_kwargs: Any) -> L.Trainer:
    """Fit `learn` with a `lightning.Trainer`; `trainer_kwargs` override `trainer_defaults`.

    With a `TensorBoardS` attached and no `logger` given, the Trainer gets a `TensorBoardLogger`
    at the same place, and `TensorBoardS` writes its run through it (one event file per run).
    Callbacks that need checkpointing, a progress bar or a logger get them turned on.
    Lightning's info lines (the accelerator banner, tips, "`Trainer.fit` stopped") are shown only
    with `verbose=True`; its warnings always are.

    `resume` (as in `Learner.fit`: a file, a directory, or "last") names a checkpoint:
    - a Lightning checkpoint (from `CheckpointS` on this engine, or a `ModelCheckpoint`) goes to
      `trainer.fit(ckpt_path=...)`: Lightning restores weights, optimizer, loops and a
      `ResumableDataLoader`'s position; the learner state comes from its "nntrain" entry;
    - a native checkpoint: the learner loads it and the Trainer's epoch 0 is the checkpoint's
      epoch (inside it, the batches already trained are fetched and run no step and fire no
      event) or the next one.
    Either way gradients, subscriber states and RNG are restored at the points where the native
    loop restores them, and the fit ends where an uninterrupted one would.

    Returns:
        The Trainer, for its `callback_metrics`, `logger` and checkpoint paths.

    Raises:
        ValueError: a Trainer option the bridge cannot honour, or a native-only subscriber.
    """
    for option, why in UNSUPPORTED_TRAINER_OPTIONS.items():
        if option in trainer_kwargs:
            raise ValueError(f"Trainer option {option}={trainer_kwargs[option]!r} is not supported by the "
                             f"nntrain bridge: {why}")
    if not isinstance(learn.model, nn.Module):
        raise TypeError(f"learn.model must be a torch.nn.Module, got {type(learn.model).__name__}")
    refuse_callbacks(trainer_kwargs.get("callbacks") or [])  # some act in their own setup, before ours
    verbose = bool(trainer_kwargs.pop("verbose", False))
    _, needs = _bridgeable([*learn.subs, *subs])
    learn.add_subs(subs)
    try:
        learn.prepare_fit(epochs, lr)
        module, callbacks = to_lightning(learn, subs=(), train=train)
        module.fit_lr = lr
        plan, module.resume_view = _restore(learn, resume, train)
        if plan is not None and lr is not None:
            set_lr(learn.opt, lr)  # a native checkpoint's optimizer state carried its lr: this fit's wins
        announce_resume(plan, int(os.environ.get("RANK", "0")))
        valid = valid and not _empty_valid(learn.dls.valid)
        ckpt_path = None
        offset = 0
        if plan is not None:
            offset = plan.epoch_offset if plan.lightning else plan.start_epoch
            if plan.lightning:
                if plan.inside_epoch and not hasattr(learn.dls.train, "load_state_dict"):
                    from nntrain.adapters.module import loader_cannot_resume

                    raise loader_cannot_resume(f"checkpoint {plan.path}", {"epoch": plan.epoch, "iter": plan.iter},
                                               learn.dls.train)
                ckpt_path = plan.path  # Lightning loads it; on_load_checkpoint makes the plan again
            else:
                plan.epoch_offset = offset
                learn.resume_plan = plan
        options = _options(learn, needs, trainer_kwargs)
        if not valid:
            options["limit_val_batches"] = 0
        if not train:  # Lightning cannot skip training and still validate; fetch one batch, step none
            options["limit_train_batches"] = 1
        user_callbacks = list(trainer_kwargs.get("callbacks") or [])
        with _lightning_info(verbose):
            trainer = L.Trainer(max_epochs=max(epochs - offset, 0), callbacks=[*callbacks, *user_callbacks], **options)
        with _spawned_results(trainer, module), _lightning_info(verbose):
            trainer.fit(module, ckpt_path=ckpt_path, weights_only=True if ckpt_path is not None else None)
        return trainer
    finally:
        learn.resume_plan = None
        learn.remove_subs(subs)


def _restore(learn: Learner, resume: Any, train: bool) -> tuple[ResumePlan | None, tuple[Any, str] | None]:
    """The resume plan for `resume`, and what it is for comparing with the other DDP ranks (see
    `LearnerModule.agree_on_resume`). In a process of a multi-process launch (torchrun, or a rank
    `strategy="ddp"` started), a checkpoint this process cannot find or read is not raised here,
    where the other ranks would wait for it, but at the Trainer's setup, on every rank together."""
    if resume is None:
        return None, None
    try:
        plan = ResumePlan.restore(learn, resume, train, lightning_ok=True)
    except (CheckpointError, OSError) as exc:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        return None, (("failed", str(exc)), f"cannot resume {str(resume)!r}: {exc}")
    if plan is None:
        return None, (("none",), f"no checkpoint found for resume={str(resume)!r}")
    return plan, (plan.key(), plan.describe())


def _eval_trainer(learn: Learner, subs: Sequence[Subscriber], trainer_kwargs: dict[str, Any]
                  ) -> tuple[L.Trainer, LearnerModule]:
    _, needs = _bridgeable([*learn.subs, *subs])
    module, callbacks = to_lightning(learn, subs=subs)
    options = _options(learn, needs, trainer_kwargs)
    user_callbacks = list(trainer_kwargs.get("callbacks") or [])
    with _lightning_info(False):
        return L.Trainer(callbacks=[*callbacks, *user_callbacks], **options), module


def evaluate_lightning(learn: Learner, dl: Any = None, subs: Sequence[Subscriber] = (),
                       **trainer_kwargs: Any) -> dict[str, float]:
    """`learn.evaluate(dl, engine="lightning")`: `trainer.validate` (dl None) or `trainer.test`."""
    if learn.opt is None:
        learn.create_opt()
    trainer, module = _eval_trainer(learn, subs, trainer_kwargs)
    with _lightning_info(False):
        if dl is None:
            results = trainer.validate(module, dataloaders=learn.dls.valid, verbose=False)
        else:
            results = trainer.test(module, dataloaders=dl, verbose=False)
    return dict(results[0]) if results else {}


def predict_lightning(learn: Learner, dl: Any = None, **trainer_kwargs: Any
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`learn.get_preds(dl, engine="lightning")`: `trainer.predict`, concatenated as natively."""
    trainer, module = _eval_trainer(learn, (), trainer_kwargs)
    with _lightning_info(False):
        outputs = trainer.predict(module, dataloaders=learn.dls.valid if dl is None else dl)
    return collate_preds(outputs or [])


def _tensorboard_logger(needs: dict[str, Any]) -> Any:
    """A TensorBoardLogger at the place a subscriber asked for (`tensorboard_dir`, same layout:
    `dir/name/version_N`), so it writes its run through the Trainer's logger; else None."""
    if "tensorboard_dir" not in needs:
        return None
    from lightning.pytorch.loggers import TensorBoardLogger

    from nntrain.subscribers.tensorboard import make_log_dir

    make_log_dir(needs["tensorboard_dir"])  # an unusable directory: a clear error, before training
    return TensorBoardLogger(save_dir=str(needs["tensorboard_dir"]), name=needs.get("tensorboard_name") or "",
                             default_hp_metric=False)


@contextlib.contextmanager
def _spawned_results(trainer: L.Trainer, module: LearnerModule) -> Iterator[None]:
    """When Lightning runs the fit in processes it starts (`ddp_spawn`, `ddp_fork`), rank 0 writes
    what the fit leaves in the learner to a temporary file and the caller's learner loads it,
    as a `ddp` run leaves it on rank 0 (Lightning itself brings back only the weights)."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    if not isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="nntrain-spawn-") as tmp:
        module.results_path = os.path.join(tmp, "results.pt")
        try:
            yield
        finally:
            module.results_path, path = None, module.results_path
        if os.path.exists(path):
            load_results(module.learn, path)


@contextlib.contextmanager
def _lightning_info(verbose: bool) -> Iterator[None]:
    """Lightning's INFO log lines off (unless `verbose`) for the duration; warnings untouched."""
    if verbose:
        yield
        return
    with quiet_loggers(("lightning.pytorch", "lightning.fabric"), logging.WARNING):
        yield
