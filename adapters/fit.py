"""Entry points: `to_lightning` for your own Trainer, `fit_lightning` behind `learn.fit(engine="lightning")`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from nntrain.adapters.callbacks import SubscriberCallback
from nntrain.adapters.module import CHECKPOINT_KEY, LearnerModule, loader_cannot_resume
from nntrain.checkpoint import check_model, find_checkpoint, is_lightning_checkpoint, restore_learner_from
from nntrain.learner import Learner, Subscriber

__all__ = ["to_lightning", "fit_lightning", "trainer_defaults", "model_device", "UNSUPPORTED_TRAINER_OPTIONS"]

UNSUPPORTED_TRAINER_OPTIONS: dict[str, str] = {
    "accumulate_grad_batches": "the learner steps the optimizer itself (manual optimization); accumulate "
    "by overriding Learner.step/zero_grad to act every N batches",
    "gradient_clip_val": "Lightning cannot clip under manual optimization; clip in a subscriber's "
    "after_backward (torch.nn.utils.clip_grad_norm_(learn.model.parameters(), ...))",
    "gradient_clip_algorithm": "see gradient_clip_val",
    "max_epochs": "pass the number of epochs as fit(epochs, ...)",
}


def _bridgeable(subs: Sequence[Subscriber]) -> tuple[list[Subscriber], torch.device | None]:
    """The subscribers that run under Lightning, and the device a DeviceS asked for.

    Raises:
        ValueError: a subscriber that cannot run under Lightning.
    """
    kept, device = [], None
    for sub in subs:
        if "lightning" in sub.engines:
            kept.append(sub)
        elif hasattr(sub, "device") and type(sub).__name__ == "DeviceS":
            device = sub.device  # Lightning places model and batches itself
        else:
            raise ValueError(
                f"{type(sub).__name__} supports the engines {sub.engines} only; remove it from the "
                f"learner's subs or fit with engine='native'"
            )
    return kept, device


def to_lightning(learn: Learner, subs: Sequence[Subscriber] = (), train: bool = True
                 ) -> tuple[LearnerModule, list[SubscriberCallback]]:
    """A LightningModule for `learn` and one Callback per subscriber (the learner's plus `subs`),
    sorted by `order`, for a Trainer you build yourself.

    Add your own Lightning callbacks next to them; set `num_sanity_val_steps=0` to keep the
    random number stream the same as a native run. `trainer.fit(module, ckpt_path=...)` resumes
    from a checkpoint of such a fit exactly (inside an epoch, the training loader must be a
    `ResumableDataLoader`).
    """
    if not isinstance(learn.model, nn.Module):
        raise TypeError(f"learn.model must be a torch.nn.Module, got {type(learn.model).__name__}")
    kept, _ = _bridgeable([*learn.subs, *subs])
    callbacks = [SubscriberCallback(sub, i) for i, sub in enumerate(sorted(kept, key=lambda s: s.order))]
    return LearnerModule(learn, train=train), callbacks


def model_device(model: nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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


def fit_lightning(learn: Learner, epochs: int, train: bool = True, valid: bool = True,
                  subs: Sequence[Subscriber] = (), lr: float | None = None, resume: Any = None,
                  **trainer_kwargs: Any) -> L.Trainer:
    """Fit `learn` with a `lightning.Trainer`; `trainer_kwargs` override `trainer_defaults`.

    With a `TensorBoardS` attached and no `logger` given, the Trainer gets a `TensorBoardLogger`
    at the same place, and `TensorBoardS` writes its run through it (one event file per run).

    `resume` (as in `Learner.fit`: a file, a directory, or "last") names a checkpoint:
    - a Lightning checkpoint (from `CheckpointS` on this engine, or a `ModelCheckpoint`) goes to
      `trainer.fit(ckpt_path=...)`: Lightning restores weights, optimizer, loops, subscriber
      states and a `ResumableDataLoader`'s position; `LearnerModule` restores the rest;
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
        if option in trainer_kwargs and not (option == "accumulate_grad_batches" and trainer_kwargs[option] == 1):
            raise ValueError(f"Trainer option {option}={trainer_kwargs[option]!r} is not supported by the "
                             f"nntrain bridge: {why}")
    if not isinstance(learn.model, nn.Module):
        raise TypeError(f"learn.model must be a torch.nn.Module, got {type(learn.model).__name__}")
    _, device = _bridgeable([*learn.subs, *subs])
    learn.add_subs(subs)
    try:
        learn.prepare_fit(epochs, lr)
        module, callbacks = to_lightning(learn, subs=(), train=train)
        ckpt_path = _resume(module, resume, train) if resume is not None else None
        options = trainer_defaults(device or model_device(learn.model))
        if not valid:
            options["limit_val_batches"] = 0
        if not train:  # Lightning cannot skip training and still validate; fetch one batch, step none
            options["limit_train_batches"] = 1
        user_callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        options.update(trainer_kwargs)
        if "logger" not in trainer_kwargs:
            options["logger"] = _tensorboard_logger(learn.subs) or False
        trainer = L.Trainer(max_epochs=max(epochs - module.epoch_offset, 0),
                            callbacks=[*callbacks, *user_callbacks], **options)
        trainer.fit(module, ckpt_path=ckpt_path)
        return trainer
    finally:
        learn.remove_subs(subs)


def _tensorboard_logger(subs: Sequence[Subscriber]) -> Any:
    """A TensorBoardLogger at the place a `TensorBoardS` among `subs` writes to (same layout:
    `log_dir/name/version_N`), so it writes its run through the Trainer's logger; else None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from nntrain.subscribers.tensorboard import TensorBoardS, make_log_dir

    tb = next((sub for sub in subs if isinstance(sub, TensorBoardS)), None)
    if tb is None:
        return None
    make_log_dir(tb.root)  # an unusable directory: TensorBoardS's clear error, before training
    return TensorBoardLogger(save_dir=str(tb.root), name=tb.name or "", default_hp_metric=False)


def _resume(module: LearnerModule, resume: Any, train: bool) -> str | None:
    """Prepare `module` to continue from the checkpoint `resume` names; return the path to give
    the Trainer as `ckpt_path` (a Lightning checkpoint), or None (a native one, loaded here, or
    `resume="last"` with nothing on disk)."""
    learn = module.learn
    found = find_checkpoint(learn, resume)
    if found is None:
        return None
    path, state = found
    if is_lightning_checkpoint(state):
        prefix = "model."
        check_model(learn, path, {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)})
    lightning = is_lightning_checkpoint(state)
    pos = state[CHECKPOINT_KEY]["position"] if lightning else state["position"]
    if pos["iter"] is not None and not train:
        raise ValueError("a checkpoint taken inside a training pass cannot resume a fit with train=False")
    if lightning:
        prefix = "model."
        check_model(learn, path, {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)})
        if pos["iter"] is not None and not hasattr(learn.dls.train, "load_state_dict"):
            raise loader_cannot_resume(f"checkpoint {path}", pos, learn.dls.train)
        module.epoch_offset = state[CHECKPOINT_KEY]["epoch_offset"]
        return str(path)
    module.resume_state = restore_learner_from(learn, path, state)
    module.epoch_offset = pos["epoch"] + (pos["iter"] is None)  # the Trainer's epoch 0
    return None
