"""`LearnerVerbs`: what a user does with a trained learner besides fitting it, fastai's everyday
verbs (`lr_find`, `fit_one_cycle`, `save`, `load`) and `infer`; `Learner` inherits them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from nntrain.devices import model_device, to_device

__all__ = ["LearnerVerbs"]


class LearnerVerbs:
    """The verbs of a `Learner` built on `fit` and its state: a mixin, each method a thin call into
    the subscriber or module that does the work."""

    if TYPE_CHECKING:  # what the verbs use of the `Learner` they are mixed into
        model: torch.nn.Module

        def call_model(self, inputs: Any) -> Any: ...

    def infer(self, x: torch.Tensor, single: bool = False) -> torch.Tensor:
        """The model's output for new inputs `x`, in eval mode, without grad, on the model's device.

        Args:
            x: a batch of inputs (or one input with `single=True`).
            single: `x` is one sample: add the batch dimension and remove it from the output.
        """
        x = to_device(x, model_device(self.model))
        if single:
            x = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, Mapping) else x.unsqueeze(0)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                out = self.call_model(x)
        finally:
            self.model.train(was_training)
        return out[0] if single else out

    def lr_find(self, start_lr: float = 1e-5, mult: float = 1.25, max_lr: float = 10.0,
                max_epochs: int = 100, engine: str = "native", **trainer_kwargs: Any) -> Any:
        """Run an `LRFindS` search and put the model and optimizer back as they were.

        Returns:
            The `LRFindS` with `.lrs`, `.losses`, `.plot()` and `.suggestion()`.
        """
        from nntrain.subscribers.lr_find import lr_find

        return lr_find(self, start_lr=start_lr, mult=mult, max_lr=max_lr, max_epochs=max_epochs, engine=engine,
                       **trainer_kwargs)

    def fit_one_cycle(self, epochs: int, lr_max: float, pct_start: float = 0.25, div: float = 25.0,
                      div_final: float = 1e5, moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
                      **fit_kwargs: Any) -> Any:
        """`fit` with fastai's one-cycle schedule (a `SchedulerS` of `OneCycle`, stepped per
        applied optimizer step): the lr rises from `lr_max/div` to `lr_max` over `pct_start` of
        the steps and falls to `lr_max/div_final` (both halves cosine); where the optimizer has a
        momentum (SGD's `momentum` > 0, Adam's beta1) it moves inversely through `moms`.
        `fit_kwargs` go to `fit` (`engine="lightning"`, `subs`, `resume`, Trainer options).

        Returns:
            What `fit` returns.
        """
        from nntrain.subscribers.schedule import fit_one_cycle

        return fit_one_cycle(self, epochs, lr_max, pct_start=pct_start, div=div, div_final=div_final, moms=moms,
                             **fit_kwargs)

    def save(self, path: str | os.PathLike, with_opt: bool = True) -> Any:
        """Write the model's weights (and the optimizer state) to `path` atomically; returns the path.
        `load` reads it back; a `SaveBestS` file is one too."""
        from nntrain.weights import save_weights

        return save_weights(self, path, with_opt=with_opt)

    def load(self, path: str | os.PathLike, with_opt: bool = True, strict: bool = True) -> None:
        """Load weights (and the optimizer state, when the file has it and `with_opt`) written by
        `save`, `SaveBestS` or a native checkpoint.

        Raises:
            CheckpointError: the file is missing, unreadable or holds no model weights.
        """
        from nntrain.weights import load_weights

        load_weights(self, path, with_opt=with_opt, strict=strict)
