"""`LearnerVerbs`: what a user does with a learner besides fitting it, fastai's everyday verbs
(`lr_find`, `fit_one_cycle`, `fine_tune`, `freeze` / `unfreeze`, `summary`, `save` / `load`,
`export`, `to_fp16` / `to_bf16`) and `infer`; `Learner` inherits them. Each is a thin call into
the module that does the work (`nntrain.freeze`, `nntrain.summary`, `nntrain.export`, ...)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from nntrain.devices import model_device, to_device
from nntrain.events import declared

__all__ = ["LearnerVerbs"]


class LearnerVerbs:
    """The verbs of a `Learner` built on `fit` and its state: a mixin, each method a thin call into
    the subscriber or module that does the work."""

    if TYPE_CHECKING:  # what the verbs use of the `Learner` they are mixed into
        model: torch.nn.Module
        opt: Any
        subs: list[Any]
        splitter: Any

        def call_model(self, inputs: Any) -> Any: ...

        def create_opt(self, lr: Any = None) -> Any: ...

        def add_subs(self, subs: Any) -> None: ...

        def remove_subs(self, subs: Any) -> None: ...

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

    def lr_find(
        self,
        start_lr: float = 1e-5,
        mult: float = 1.25,
        max_lr: float = 10.0,
        max_epochs: int = 100,
        engine: str = "native",
        trim: bool = True,
        **trainer_kwargs: Any,
    ) -> Any:
        """Run an `LRFindS` search and put the model and optimizer back as they were (see
        `nntrain.subscribers.lr_find.lr_find`).

        Returns:
            A `SuggestedLRs`: `.valley`, `.steepest`, `.minimum`, `.slide` (shown by its repr; a
            notebook shows its plot), the curve `.lrs`, `.losses`, and `.plot()`, `.suggestion()`.
            With `trim` (the default) the suggestions leave out the curve's first tenth and
            last five points, as fastai.
        """
        from nntrain.subscribers.lr_find import lr_find

        return lr_find(
            self,
            start_lr=start_lr,
            mult=mult,
            max_lr=max_lr,
            max_epochs=max_epochs,
            engine=engine,
            trim=trim,
            **trainer_kwargs,
        )

    def fit_one_cycle(
        self,
        epochs: int,
        lr_max: float | slice,
        pct_start: float = 0.25,
        div: float = 25.0,
        div_final: float = 1e5,
        moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
        **fit_kwargs: Any,
    ) -> Any:
        """`fit` with fastai's one-cycle schedule (a `SchedulerS` of `OneCycle`, stepped per
        applied optimizer step): the lr rises from `lr_max/div` to `lr_max` over `pct_start` of
        the steps and falls to `lr_max/div_final` (both halves cosine); where the optimizer has a
        momentum (SGD's `momentum` > 0, Adam's beta1) it moves inversely through `moms`.
        `lr_max=slice(lo, hi)` gives each parameter group its own peak (`nntrain.optim.lr_range`).
        `fit_kwargs` go to `fit` (`engine="lightning"`, `subs`, `resume`, Trainer options).

        Returns:
            What `fit` returns.
        """
        from nntrain.subscribers.schedule import fit_one_cycle

        if isinstance(lr_max, slice):  # the optimizer needs the parameter groups before the cycle sets their lrs
            from nntrain.freeze import use_lr
            from nntrain.optim import check_lr_range

            check_lr_range(lr_max, "lr_max")
            if self.opt is None:
                self.create_opt(lr_max)
            else:
                use_lr(self, lr_max)

        return fit_one_cycle(
            self, epochs, lr_max, pct_start=pct_start, div=div, div_final=div_final, moms=moms, **fit_kwargs
        )

    def fine_tune(
        self,
        epochs: int,
        base_lr: float = 2e-3,
        freeze_epochs: int = 1,
        lr_mult: float = 100,
        pct_start: float = 0.3,
        div: float = 5.0,
        train_bn: bool = True,
        **fit_kwargs: Any,
    ) -> Any:
        """fastai's `fine_tune`: train the head alone, then the whole model with discriminative lrs.

        `freeze()`, `fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)`, then
        `base_lr /= 2`, `unfreeze()`, `fit_one_cycle(epochs, slice(base_lr / lr_mult, base_lr),
        pct_start=pct_start, div=div)`. `freeze_epochs=0` skips the first part. `fit_kwargs` go
        to both fits (`engine="lightning"`, `subs`, Trainer options).

        Returns:
            What the last `fit` returns.
        """
        if freeze_epochs:
            self.freeze(train_bn=train_bn)
            self.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99, **fit_kwargs)
        base_lr /= 2
        self.unfreeze()
        return self.fit_one_cycle(epochs, slice(base_lr / lr_mult, base_lr), pct_start=pct_start, div=div, **fit_kwargs)

    def freeze_to(self, n: int, train_bn: bool = True, splitter: Any = None) -> None:
        """Freeze the first `n` parameter groups (negative: all but the last `-n`) and unfreeze the
        rest; the groups come from `splitter` (kept as the learner's), the learner's `splitter`,
        or the default body and head (`nntrain.freeze`). With `train_bn` normalization layers
        keep training, as fastai.

        Raises:
            ValueError: a model the default splitter cannot cut (fewer than two children), or a
                splitter whose groups miss or repeat parameters.
        """
        from nntrain.freeze import freeze_to

        if splitter is not None:
            self.splitter = splitter
        freeze_to(self, n, train_bn)

    def freeze(self, train_bn: bool = True, splitter: Any = None) -> None:
        """Freeze every parameter group but the last (the head): `freeze_to(-1)`."""
        self.freeze_to(-1, train_bn, splitter)

    def unfreeze(self) -> None:
        """Train every parameter again."""
        for p in self.model.parameters():
            p.requires_grad_(True)

    def summary(self, batch: Any = None) -> Any:
        """The model's layers, their output shapes on one batch, parameter counts, and whether
        they train or are frozen, then the totals and the learner's setup; prints as a table.
        The model and the random number generators are left as they were (`nntrain.summary`).

        Args:
            batch: the batch (or the inputs) to run; default the validation loader's first.
        """
        from nntrain.summary import summarize

        return summarize(self, batch)

    def export(self, path: str | os.PathLike = "export.pt") -> Any:
        """Write the model and what `infer` needs (not the data, not the optimizer) to `path`;
        `nntrain.load_learner(path)` reads it back, safely by default (`nntrain.export`).
        Returns the path."""
        from nntrain.export import export_learner

        return export_learner(self, path)

    def to_fp16(self, **scaler_args: Any) -> Any:
        """Train in mixed precision with float16 (a `MixedPrecisionS`, replacing one attached);
        `scaler_args` go to its GradScaler. Returns the learner, as fastai's."""
        return self._set_precision(torch.float16, scaler_args)

    def to_bf16(self) -> Any:
        """Train in mixed precision with bfloat16 (a `MixedPrecisionS`, replacing one attached).
        Returns the learner."""
        return self._set_precision(torch.bfloat16, {})

    def to_fp32(self) -> Any:
        """Train in full precision again: detach the mixed-precision subscriber. Returns the learner."""
        return self._set_precision(None, {})

    def _set_precision(self, dtype: Any, scaler_args: dict[str, Any]) -> Any:
        from nntrain.subscribers.precision import MixedPrecisionS

        self.remove_subs([s for s in self.subs if declared(s, "role") == MixedPrecisionS.role])
        if dtype is not None:
            self.add_subs([MixedPrecisionS(dtype, **scaler_args)])
        return self

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
