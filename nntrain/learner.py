"""`Learner`: the model, data, loss and optimizer, one declared learner state, the overridable
steps, and the envelope that `fit`, `evaluate` and `get_preds` share on every engine.

The loop itself is an engine's (`nntrain.engines.NativeEngine` natively, `nntrain.adapters`
under Lightning); the events and their scopes are `nntrain.events` and `nntrain.dispatch`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nntrain.checks import (
    _check_loss,
    _empty_valid,
    _note_model_failure,
    _note_shapes,
    announce_resume,
    check_batch_structure,
    check_fit_args,
    check_loaders,
    loader_length,
    split_batch,
)
from nntrain.devices import default_placement, model_device, resolve_device
from nntrain.dispatch import Dispatcher
from nntrain.engines import NativeEngine, collate_preds, resolve_engine
from nntrain.events import (
    EVENTS,
    CancelBatchException,
    CancelEpochException,
    CancelException,
    CancelFitException,
    CancelStepException,
    Subscriber,
    check_subscribers,
)
from nntrain.freeze import Splitter, make_optimizer, use_lr
from nntrain.optim import LR, check_lr_range, get_lr, set_lr
from nntrain.verbs import LearnerVerbs

# fmt: off
__all__ = ["Learner", "MomentumLearner",  # and, re-exported from their modules, for `from nntrain.learner import ...`:
           "EVENTS", "CancelException", "CancelFitException", "CancelEpochException", "CancelBatchException",
           "CancelStepException", "Subscriber", "get_lr", "set_lr", "model_device", "collate_preds", "loader_length"]
# fmt: on


class Learner(LearnerVerbs):
    """Trains `model` on `dls` with `loss_fn` and an optimizer made by `optim_class(params, lr)`.

    Every field of the learner state is set in `__init__`, in one block, with what it holds.
    The loop position fields are written only by the `Dispatcher`'s scopes, which both engines
    drive; subscribers read them, and may replace `batch`, `preds`, `loss` and `loss_grad`.
    The step is made of the overridable methods `predict`, `get_loss`, `backward`, `step`,
    `zero_grad`; both engines call them. The verbs beyond `fit` (`lr_find`, `fit_one_cycle`,
    `save`, `load`, `infer`) come from `nntrain.verbs.LearnerVerbs`.

    `device` ("auto": the GPU when there is one, else the CPU; a device or its name; None: leave
    the model where it is) is where `fit` and `evaluate` run, on both engines, unless a
    subscriber places the model itself (`DeviceS`, for explicit control): see `placement`.
    """

    def __init__(
        self,
        model: nn.Module,
        dls: Any,
        loss_fn: Callable[..., torch.Tensor],
        optim_class: Callable[..., Any] = torch.optim.SGD,
        lr: LR = 0.1,
        subs: Sequence[Subscriber] = (),
        device: str | torch.device | None = "auto",
        splitter: Splitter | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (hasattr(dls, "train") and hasattr(dls, "valid")):
            raise TypeError(
                f"dls must have .train and .valid loaders (use nntrain.DataLoaders), got {type(dls).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not callable(optim_class):
            raise TypeError(f"optim_class must be callable as optim_class(params, lr), got {optim_class!r}")
        check_lr_range(lr)
        if splitter is not None and not callable(splitter):
            raise TypeError(f"splitter must be callable as splitter(model) -> parameter groups, got {splitter!r}")
        # --- what is trained: given here, the user's to change ------------------------------------
        self.model = model  # the nn.Module trained (its `training` flag is the pass's mode)
        self.dls = dls  # `.train` and `.valid` loaders
        self.loss_fn = loss_fn  # `loss_fn(preds, targets)` -> a scalar tensor
        self.optim_class = optim_class  # `optim_class(params, lr)` -> the optimizer
        self.lr = lr  # the learning rate of the next fit (`fit(lr=...)` changes it for later fits too)
        self.splitter = splitter  # model -> parameter groups (freeze, lr=slice); None: body and head (nntrain.freeze)
        self.subs: list[Subscriber] = check_subscribers(subs)  # attached to every fit
        self.device = resolve_device(device)  # where fits run when no subscriber places the model (None: as is)
        self.opt: Any = None  # made by the first fit (`create_opt`) and kept: its state survives fits
        # --- the engine running the fit, and the dispatcher it drives ------------------------------
        self.engine: Any = NativeEngine()  # what subscribers ask: rank, backward, step, logging...
        self.dispatch = Dispatcher(self)  # the events and scopes; its scopes write the position below
        # --- the loop position: written only by the dispatcher's scopes ---------------------------
        self.n_epochs = 0  # epochs of the fit (all of them, also those a resume skips)
        self.epochs: range = range(0)  # range(n_epochs)
        self.fit_valid = True  # whether this fit runs validation passes
        self.mode = "train"  # the pass running: "train", "valid" or "test"
        self.epoch = 0  # 0-based epoch of the pass
        self.dl: Any = None  # the pass's loader
        self.n_batches: int | None = None  # batches in the pass (None when the loader has no length)
        self.iter = 0  # 0-based batch index in the pass
        # --- the batch: set by the loop; subscribers may replace them ----------------------------
        self.batch: Any = None  # as the loader yielded it (DeviceS moves it)
        self.preds: Any = None  # the model's output
        self.loss: Any = None  # the batch's loss
        self.loss_grad: Any = None  # what backward differentiates: `loss` unless a subscriber scaled it
        # --- counters, recipes, logged values -----------------------------------------------------
        self.global_step = 0  # optimizer steps applied, over all fits
        self.grad_scaling: Any = None  # a nntrain.amp.GradScaling while fp16 training scales the loss
        self.logs: dict[str, float] = {}  # the current epoch's logged values by name (`learn.log`)
        self.resume_plan: Any = None  # the checkpoint this fit continues from (a ResumePlan), else None
        self.fit_lr: LR | None = None  # the `lr=` given to the running fit (None: none given)
        self.finished = False  # a subscriber ended the run early (EarlyStoppingS): checkpoints say so
        self.trainer: Any = None  # the lightning.Trainer of the latest fit(engine="lightning"), else None
        self.scheduler: Any = None  # the SchedulerS of the latest scheduled fit (it sets itself here)
        self.dispatch.set_subs(self.subs)

    # ----- subscribers and dispatch -------------------------------------------------------

    def add_subs(self, subs: Iterable[Subscriber]) -> None:
        """Attach `subs` and re-sort the dispatch table.

        Raises:
            TypeError: an entry is not a subscriber instance (see `check_subscribers`).
        """
        subs = check_subscribers(subs)
        self.dispatch.set_subs([*self.subs, *subs])  # raises on a misspelt handler before anything is attached
        self.subs.extend(subs)

    def remove_subs(self, subs: Iterable[Subscriber]) -> None:
        """Detach `subs` (each once) and re-sort the dispatch table."""
        for sub in subs or ():
            if sub in self.subs:
                self.subs.remove(sub)
        self.dispatch.set_subs(self.subs)

    def placement(self, subs: Sequence[Subscriber] = ()) -> list[Subscriber]:
        """The `DeviceS` placing model and batches on `self.device` for a fit with `subs`, or none."""
        return default_placement(self.model, self.device, [*self.subs, *subs])

    def publish(self, event: str) -> None:
        """Call every subscriber's handler for `event`, in `order`."""
        self.dispatch.publish(event)

    def log(self, values: Mapping[str, float]) -> None:
        """Log values by name (`valid/loss`): kept in `learn.logs` for the other subscribers (progress,
        TensorBoard, early stopping read them in `after_epoch`) and sent to the engine (Lightning's loggers)."""
        self.logs.update(values)
        self.engine.log_metrics(dict(values))

    @property
    def training(self) -> bool:
        """True in a training pass, False in a validation pass."""
        return self.model.training

    # ----- the step: override these in subclasses -------------------------------------------

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        """`(inputs, targets)` of `batch` (see `nntrain.learner.split_batch`: tuples, lists and
        Hugging Face-style mappings); override it for other batch structures."""
        if type(batch) is tuple and len(batch) >= 2:  # the common case, without a call (per batch, twice)
            return batch[0], batch[1]
        try:
            return split_batch(batch)
        except TypeError as exc:
            check_batch_structure(exc, batch, self.mode)
            raise

    def call_model(self, inputs: Any) -> Any:
        """`model(inputs)`, or `model(**inputs)` for a mapping; a Hugging Face output's `logits`."""
        if isinstance(inputs, torch.Tensor):  # the common case first: a cheap check per batch
            out = self.model(inputs)
        else:
            out = self.model(**inputs) if isinstance(inputs, Mapping) else self.model(inputs)
        if type(out) is not torch.Tensor and hasattr(out, "logits"):
            return out.logits
        return out

    def predict(self) -> None:
        """Forward pass: `self.preds = call_model(inputs)`, the inputs from `split_batch`.

        Raises:
            TypeError: the batch is no `(inputs, targets)` tuple or list nor a mapping (a bare
                tensor would make `batch[0]` its first sample).
        """
        inputs = self.split_batch(self.batch)[0]
        try:
            self.preds = self.call_model(inputs)
        except Exception as exc:  # free when nothing is raised
            _note_model_failure(exc, inputs, self.model.training, self.model)
            raise

    def get_loss(self) -> None:
        """`self.loss = loss_fn(preds, targets)`, the targets from `split_batch`; a failure gets a
        note with both shapes."""
        targets = self.split_batch(self.batch)[1]
        if targets is None:
            check_batch_structure(None, self.batch, self.mode)
        try:
            self.loss = loss = self.loss_fn(self.preds, targets)
        except Exception as exc:  # free when nothing is raised: shapes are read only on failure
            _note_shapes(exc, self.preds, targets)
            raise
        if type(loss) is not torch.Tensor or loss.ndim != 0:
            _check_loss(loss)

    def backward(self) -> None:
        """Backpropagate `self.loss_grad` through the engine (Lightning applies its precision
        here); with `grad_scaling`, the loss is scaled and the new gradients unscaled, so
        `after_backward` sees true gradients."""
        scaling = self.grad_scaling
        if scaling is None:
            self.engine.backward(self.loss_grad)
        else:
            scaling.backward(self.model.parameters(), self.engine.backward, self.loss_grad)

    def step(self) -> None:
        """Take an optimizer step (through the engine: Lightning's precision and strategy apply).

        Raises:
            CancelStepException: the gradient scaler skipped the step (inf/NaN gradients).
        """
        scaling = self.grad_scaling
        if scaling is None:
            self.engine.step(self.opt)
        elif not scaling.step(self.opt, self.engine.step):
            raise CancelStepException()

    def zero_grad(self) -> None:
        """Reset the gradients."""
        self.opt.zero_grad()

    def run_step(self) -> None:
        """The body of a batch, with its inner events; every engine calls this."""
        publish = self.dispatch.publish
        self.predict()
        publish("after_predict")
        self.get_loss()
        publish("after_loss")
        if self.model.training:
            self.optimize(self.step)

    def optimize(self, step: Callable[[], None]) -> None:
        """The training half of a batch: `before_backward`, `backward`, `after_backward`,
        `before_step`, `step()` (a `CancelStepException` skips the rest), `after_step`, `zero_grad`."""
        publish = self.dispatch.publish
        self.loss_grad = self.loss
        publish("before_backward")
        self.backward()
        publish("after_backward")
        try:
            publish("before_step")
            step()
        except CancelStepException:
            return
        self.global_step += 1
        publish("after_step")
        self.zero_grad()

    # ----- the envelope: fit, evaluate, get_preds ---------------------------------------------

    def create_opt(self, lr: LR | None = None) -> Any:
        """Make `self.opt` from `optim_class(model.parameters(), lr)` and return it; with a slice
        `lr` or a `splitter`, over the parameter groups, each with its lr (`nntrain.freeze`)."""
        self.opt = make_optimizer(self, self.lr if lr is None else lr)
        if not (callable(getattr(self.opt, "step", None)) and callable(getattr(self.opt, "zero_grad", None))):
            raise TypeError(
                f"optim_class returned {type(self.opt).__name__}, which lacks step() and zero_grad(); "
                f"pass a torch.optim optimizer class or a callable (params, lr) -> optimizer"
            )
        return self.opt

    def prepare_fit(self, lr: LR | None) -> None:
        """Check the loaders and set up the optimizer (shared by every engine).

        The optimizer is made on the first fit and kept afterwards (its state survives between
        fits); `lr` sets the learning rate for this fit and the ones after it.
        """
        check_loaders(self.dls, self.model, mapping_targets=type(self).split_batch is Learner.split_batch)
        if self.opt is None:
            self.create_opt(lr)
        elif lr is not None:
            use_lr(self, lr)  # a slice first gives the optimizer the splitter's groups
        if lr is not None:
            self.lr = lr

    def fit(
        self,
        epochs: int,
        train: bool = True,
        valid: bool = True,
        subs: Sequence[Subscriber] = (),
        lr: LR | None = None,
        engine: str = "native",
        resume: str | os.PathLike | None = None,
        **trainer_kwargs: Any,
    ) -> Any:
        """Train for `epochs` epochs, each a training pass then a validation pass.

        Args:
            epochs: number of epochs.
            train: run the training pass of each epoch.
            valid: run the validation pass of each epoch.
            subs: subscribers attached for this call only (always removed afterwards).
            lr: learning rate for this fit (kept for later fits); `slice(lo, hi)` spreads it over
                the parameter groups (`nntrain.optim.lr_range`), as fastai's discriminative lrs.
            engine: "native" (`NativeEngine`'s loop) or a registered engine ("lightning": a
                `lightning.Trainer`, see `nntrain.adapters`); `trainer_kwargs` go to the Trainer.
            resume: continue exactly from a checkpoint: a file, a directory (its newest loadable
                file), or "last" (the newest in the attached `CheckpointS`'s directory; with none
                on disk the fit starts from the beginning). `epochs` is the total: a run meant
                for 3 epochs resumes with `fit(3, resume=...)`.

        Returns:
            None, on every engine (under Lightning the Trainer is `learn.trainer` afterwards).

        Raises:
            CheckpointError: the checkpoint is unreadable, incomplete or for another model.
        """
        subs = check_subscribers(subs)
        subs = [*subs, *self.placement(subs)]
        check_fit_args(lr, resume)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        runner = resolve_engine(engine)
        runner.check(self, [*self.subs, *subs], trainer_kwargs)
        self.add_subs(subs)
        try:
            self.prepare_fit(lr)
            plan = None
            if resume is not None:
                plan = runner.restore(self, resume, epochs, train)
                if plan is not None and lr is not None:  # the checkpoint's optimizer state carried its lr
                    set_lr(self.opt, lr)
                announce_resume(plan, int(os.environ.get("RANK", "0")))
                if plan is not None and plan.finished:  # ended early (check_fits warned)
                    return None
            valid = valid and not _empty_valid(self.dls.valid)
            self.resume_plan, self.fit_lr = plan, lr
            runner.fit(self, epochs, plan, train, valid, lr, trainer_kwargs)
            return None
        finally:
            self.resume_plan, self.fit_lr = None, None
            self.remove_subs(subs)
            self.release_graph()

    def evaluate(
        self, dl: Any = None, subs: Sequence[Subscriber] = (), engine: str = "native", **trainer_kwargs: Any
    ) -> dict[str, float]:
        """One evaluation pass over `dl` (mode "test"; the validation loader, mode "valid", when
        None) with the fit and epoch events, as Keras's `evaluate` or fastai's `validate`.

        Returns:
            The values subscribers logged for the pass by name (`MetricsS`: `test/loss`,
            `test/<metric>`), the same on every engine.
        """
        subs = check_subscribers(subs)
        subs = [*subs, *self.placement(subs)]
        runner = resolve_engine(engine)
        runner.check(self, [*self.subs, *subs], trainer_kwargs)
        mode = "valid" if dl is None else "test"
        self.add_subs(subs)
        try:
            if self.opt is None:
                self.create_opt()
            runner.evaluate(self, self.dls.valid if dl is None else dl, mode, trainer_kwargs)
        finally:
            self.remove_subs(subs)
            self.release_graph()
        return {k: v for k, v in self.logs.items() if k.startswith(f"{mode}/")}

    def get_preds(
        self, dl: Any = None, engine: str = "native", **trainer_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's predictions over `dl` (default: the validation loader) in eval mode,
        without grad and without events, with the targets where batches are `(inputs, targets)`.

        Returns:
            `(preds, targets)`, each concatenated over the batches (targets None if there are none).
        """
        runner = resolve_engine(engine)
        runner.check(self, [], trainer_kwargs)
        try:
            return runner.get_preds(self, self.dls.valid if dl is None else dl, trainer_kwargs)
        finally:
            self.release_graph()

    def release_graph(self) -> None:
        """Drop the last batch's graph (after a fit or an error): detach `loss`, `preds`; no `loss_grad`."""
        self.loss_grad = None
        if isinstance(self.loss, torch.Tensor):
            self.loss = self.loss.detach()
        if isinstance(self.preds, torch.Tensor):
            self.preds = self.preds.detach()

    def predict_batch(self) -> tuple[torch.Tensor, Any]:
        """`predict` on `self.batch`; returns `(preds, targets or None)` (both engines' predict
        step). A bare tensor batch is the inputs alone."""
        batch = self.batch
        if not isinstance(batch, (tuple, list, Mapping)):
            batch = self.batch = (batch,)
        self.predict()
        return self.preds, self.split_batch(batch)[1]


class MomentumLearner(Learner):
    """A `Learner` whose `zero_grad` keeps `mom * grad` instead of zeroing: gradients with momentum."""

    def __init__(
        self,
        model: nn.Module,
        dls: Any,
        loss_fn: Callable[..., torch.Tensor],
        optim_class: Callable[..., Any] = torch.optim.SGD,
        lr: LR = 0.1,
        subs: Sequence[Subscriber] = (),
        mom: float = 0.85,
        device: str | torch.device | None = "auto",
        splitter: Splitter | None = None,
    ) -> None:
        super().__init__(model, dls, loss_fn, optim_class, lr, subs, device, splitter)
        self.mom = mom

    def zero_grad(self) -> None:
        """Scale every existing gradient by `mom` (parameters without a grad are skipped)."""
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.mom)
