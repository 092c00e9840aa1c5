"""Binding a learner to a Lightning Trainer for one run, and giving it back: `bind` at the
Trainer's `setup`, `give_back` at its `teardown` or, when the run fails, once every callback has
handled the exception (an `OnExceptionCheckpoint` saves the run as it was first)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from nntrain.engines import NativeEngine
from nntrain.events import declared

__all__ = ["bind", "give_back", "GiveBackOnException", "match_optimizer_state"]

_FLAGS = {"gradient clipping": "gradient_clip_val", "gradient accumulation": "accumulate_grad_batches"}


def bind(module: Any, trainer: L.Trainer, subs: list[Any], stage: str) -> dict[str, Any]:
    """Make the learner run under `trainer`: its engine, its dispatch (the subscribers, the
    recipes the Trainer's flags asked for, the bridge's own), the fp16 gradient scaling of a
    `16-mixed` plugin. Returns what `give_back` restores.

    Raises:
        ValueError: two subscribers with one role (a recipe both attached and asked by a flag).
    """
    from nntrain.adapters.engine import LightningEngine
    from nntrain.adapters.precision import bridge_subscribers

    learn = module.learn
    if stage == "fit" and trainer.world_size > 1:
        _warn_unshuffled_order(learn.dls.train, trainer)
    learn.engine = LightningEngine(module, trainer)
    origins = {
        id(sub): f"from the Trainer's {flag}={module.taken_flags[flag]}"
        for sub in module.recipe_subs
        if (flag := _FLAGS.get(declared(sub, "role"), "")) in module.taken_flags
    }
    learn.dispatch.set_subs([*subs, *module.recipe_subs, *bridge_subscribers(module, trainer)], origins)
    learn.dispatch.reset(propagate=False, agree=learn.engine.agree_cancel if trainer.world_size > 1 else None)
    saved = {
        "grads": [p.grad for p in learn.model.parameters()],  # Lightning sets them to None at its start
        "dtypes": [t.dtype for t in learn.model.state_dict().values()],
        "opt": learn.opt,
        "training": learn.model.training,
        "grad_scaling": learn.grad_scaling,
    }
    if learn.engine.scaler is not None:  # 16-mixed: the plugin scales; the gradients are handled as natively
        from nntrain.amp import GradScaling

        learn.grad_scaling = GradScaling(learn.engine.scaler, owned=False)
    return saved


def _warn_unshuffled_order(loader: Any, trainer: L.Trainer) -> None:
    """Under DDP Lightning gives the training loader a `DistributedSampler` that shuffles: say so
    (rank 0) when the loader was made to keep its order."""
    from torch.utils.data import SequentialSampler

    replaced = getattr(trainer._accelerator_connector, "use_distributed_sampler", True)
    if replaced and isinstance(getattr(loader, "sampler", None), SequentialSampler) and trainer.is_global_zero:
        import warnings

        warnings.warn(
            "under DDP Lightning gives the training loader a DistributedSampler that shuffles (seed 0 + "
            "epoch), although it was made with shuffle=False: to keep its order, pass "
            "use_distributed_sampler=False and give the loader a sampler that splits the data by rank",
            RuntimeWarning,
            stacklevel=2,
        )


def give_back(module: Any, trainer: L.Trainer, saved: dict[str, Any], stage: str) -> None:
    """Give the learner back its optimizer (its state in the parameters' dtypes), engine, dispatch,
    dtypes and mode, and the Trainer its flags; a spawned rank 0 writes what the caller's learner
    gets (`nntrain.adapters.results`)."""
    from nntrain.adapters.engine import give_back_trainer_recipes

    learn = module.learn
    learn.opt = saved["opt"] if saved["opt"] is not None else module.plain_opt
    learn.grad_scaling = saved["grad_scaling"]
    _restore_dtypes(learn.model, saved["dtypes"])
    match_optimizer_state(learn.opt)
    give_back_trainer_recipes(trainer, module.taken_flags)
    module.taken_flags = {}
    if stage == "fit" and module.results_path is not None and trainer.is_global_zero:
        from nntrain.adapters.results import save_results

        save_results(learn, module.results_path)  # a spawned rank 0: for the caller's learner
    if hasattr(learn.engine, "close"):
        learn.engine.close()
    learn.engine = NativeEngine()
    learn.dispatch.set_subs(learn.subs)
    learn.dispatch.reset()
    if stage in ("validate", "test"):  # as a native evaluate leaves it: in the mode of its (eval) pass
        learn.model.train(learn.mode == "train")
    elif stage != "fit":  # predict: as get_preds leaves it
        learn.model.train(saved["training"])


class GiveBackOnException(L.Callback):
    """The last callback of a bridged run: when the run fails, it gives the learner back after
    every other callback's `on_exception` (Lightning calls no `teardown` hook then), so an
    `OnExceptionCheckpoint` saves the run's own weights and optimizer state first."""

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    @property
    def state_key(self) -> str:
        """One per learner callback."""
        return "nntrain.GiveBackOnException"

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:  # noqa: D102
        self.callback.give_back(trainer, str(getattr(trainer.state.fn, "value", trainer.state.fn)))


def _restore_dtypes(model: torch.nn.Module, dtypes: list[torch.dtype]) -> None:
    """Put every parameter and buffer back in its dtype (a `*-true` precision converted them)."""
    tensors = list(model.state_dict(keep_vars=True).values())
    if all(t.dtype == d for t, d in zip(tensors, dtypes)):
        return
    with torch.no_grad():
        for t, dtype in zip(tensors, dtypes):
            if t.dtype != dtype:
                t.data = t.data.to(dtype)
                if isinstance(t, torch.nn.Parameter) and t.grad is not None:
                    t.grad = t.grad.to(dtype)


def match_optimizer_state(opt: Any) -> None:
    """Each optimizer state tensor shaped like its parameter (Adam's moments, a momentum buffer)
    in the parameter's dtype, where a `*-true` precision converted the parameters (at the run's
    start) or the bridge converted them back (at its end): else the next step mixes dtypes (a
    native Adam step after `bf16-true` failed, and a `bf16-true` fit after an Adam fit)."""
    state = getattr(opt, "state", None)
    if not state:
        return
    with torch.no_grad():
        for p, entry in state.items():
            if not isinstance(p, torch.Tensor) or not isinstance(entry, dict):
                continue
            for key, value in entry.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.is_floating_point()
                    and value.dtype != p.dtype
                    and value.shape == p.shape
                ):
                    entry[key] = value.to(p.dtype)
