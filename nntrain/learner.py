"""The event loop: `Learner`, the event registry, the cancel exceptions and the dispatcher.

A fit publishes events to subscribers. Scopes nest as fit > epoch > batch; each scope fires
`before_<scope>`, runs its body, fires `after_<scope>`, and always fires `cleanup_<scope>`
(in a `finally`). Inside a batch the step fires `after_predict`, `after_loss` and, when
training, `after_backward` and `after_step`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from nntrain.checkpoint import CheckpointError, apply_subscriber_states, restore_learner, resumed_batches

__all__ = [
    "EVENTS",
    "CancelException",
    "CancelFitException",
    "CancelEpochException",
    "CancelBatchException",
    "Subscriber",
    "Learner",
    "MomentumLearner",
    "get_lr",
    "set_lr",
    "CheckpointError",
]

EVENTS: tuple[str, ...] = (
    "before_fit",
    "after_fit",
    "cleanup_fit",
    "before_epoch",
    "after_epoch",
    "cleanup_epoch",
    "before_batch",
    "after_batch",
    "cleanup_batch",
    "after_predict",
    "after_loss",
    "after_backward",
    "after_step",
)
"""Every event a subscriber may handle, in no particular order."""

_EVENT_LIKE = re.compile(r"^(before|after|cleanup)_")


class CancelException(Exception):
    """Base of the three flow-control exceptions; never an error."""


class CancelFitException(CancelException):
    """Stop training now. `after_fit` does not fire; the open `cleanup_batch`, `cleanup_epoch`
    and `cleanup_fit` do, and `fit` returns normally."""


class CancelEpochException(CancelException):
    """Skip the rest of this epoch. `after_epoch` does not fire; `cleanup_epoch` does (and
    `cleanup_batch` if raised inside a batch), and the next epoch (or the validation half of
    this one) starts."""


class CancelBatchException(CancelException):
    """Skip the rest of this batch. `after_batch` does not fire; `cleanup_batch` does, and the
    next batch starts. Raised before `backward`, it also skips the optimizer step."""


class Subscriber:
    """Base class for subscribers: define methods named after `EVENTS`, each taking the learner.

    `order` sorts subscribers (lower runs first). `engines` names the engines the subscriber
    runs on; on an engine that does the job itself (Lightning places the model on its device),
    a subscriber lists only the other engines and is left out there. `reports` marks a
    subscriber that only reports (metrics, progress, logs): `lr_find` detaches it during the
    search, so a search prints and logs nothing.
    """

    order: int = 0
    engines: tuple[str, ...] = ("native", "lightning")
    reports: bool = False

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints; none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def event_handlers(subs: Iterable[Subscriber]) -> dict[str, tuple[Callable[[Any], None], ...]]:
    """Map each event to the bound handlers of `subs`, sorted by `order` (stable).

    Raises:
        AttributeError: a subscriber has a method that looks like an event but is none.
    """
    ordered = sorted(subs, key=lambda s: s.order)
    for sub in ordered:
        for name in dir(type(sub)):
            if _EVENT_LIKE.match(name) and name not in EVENTS and callable(getattr(sub, name)):
                raise AttributeError(
                    f"{type(sub).__name__}.{name} looks like an event handler but '{name}' is not an "
                    f"event. Valid events: {', '.join(EVENTS)}. Rename the method (a leading "
                    f"underscore marks a helper)."
                )
    table = {}
    for event in EVENTS:
        table[event] = tuple(h for h in (getattr(s, event, None) for s in ordered) if h is not None)
    return table


def _name_source(exc: BaseException, handler: Callable[[Any], None], event: str) -> None:
    """Attach the failing subscriber and event to `exc` (once), keeping its type and args."""
    sub = getattr(handler, "__self__", handler)
    note = f"raised in subscriber {type(sub).__name__} while handling event '{event}'"
    notes = getattr(exc, "__notes__", [])
    if note not in notes and hasattr(exc, "add_note"):
        exc.add_note(note)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}"
    return f"a {type(x).__name__}"


def _note_shapes(exc: BaseException, preds: Any, targets: Any) -> None:
    """Attach the shapes of predictions and targets to a failure of the loss function."""
    shape = lambda t: tuple(t.shape) if hasattr(t, "shape") else type(t).__name__  # noqa: E731
    if hasattr(exc, "add_note"):
        exc.add_note(f"loss_fn(preds, targets) failed: preds shape {shape(preds)}, targets shape {shape(targets)}")


def _check_batch_structure(exc: Exception, batch: Any, training: bool) -> None:
    """Raise a TypeError naming the expected `(inputs, targets)` when a failed batch is not one."""
    if batch is None or (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        return
    mode = "training" if training else "validation"
    raise TypeError(f"a batch must be a pair (inputs, targets) (a tuple or list of at least 2); the "
                    f"{mode} loader yielded {_describe(batch)}") from exc


class Engine(Protocol):
    """What a learner needs from the engine that runs it: how to backpropagate."""

    name: str

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`."""


class NativeEngine:
    """The learner's own loop: plain autograd."""

    name = "native"

    def backward(self, loss: torch.Tensor) -> None:
        """Call `loss.backward()`."""
        loss.backward()


def get_lr(opt: Any) -> float:
    """The learning rate of `opt`: its first param group's, or its `lr` attribute."""
    if hasattr(opt, "param_groups"):
        return opt.param_groups[0]["lr"]
    return opt.lr


def set_lr(opt: Any, lr: float) -> None:
    """Set the learning rate of every param group of `opt` (or its `lr` attribute)."""
    if hasattr(opt, "param_groups"):
        for group in opt.param_groups:
            group["lr"] = lr
    else:
        opt.lr = lr


class Learner:
    """Trains `model` on `dls` with `loss_fn` and an optimizer made by `optim_class(params, lr)`.

    State kept current during a fit, for subscribers: `epoch`, `epochs` (a range), `n_epochs`,
    `dl`, `iter` (batch index in the epoch), `global_step` (optimizer steps so far, all fits),
    `batch`, `preds`, `loss`, `opt`, `training` (`model.training`) and `fit_valid` (whether this
    fit runs validation passes).
    The step is made of the overridable methods `predict`, `get_loss`, `backward`, `step`,
    `zero_grad`; both engines call them.
    """

    def __init__(
        self,
        model: nn.Module,
        dls: Any,
        loss_fn: Callable[..., torch.Tensor],
        optim_class: Callable[..., Any] = torch.optim.SGD,
        lr: float = 0.1,
        subs: Sequence[Subscriber] = (),
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
        self.model = model
        self.dls = dls
        self.loss_fn = loss_fn
        self.optim_class = optim_class
        self.lr = lr
        self.subs: list[Subscriber] = list(subs)
        self.opt: Any = None
        self.engine: Engine = NativeEngine()
        self.global_step = 0
        self.epoch = 0
        self.iter = 0
        self.batch: Any = None
        self._resume: dict[str, Any] | None = None  # a loaded checkpoint whose position is still ahead
        self._handlers = event_handlers(self.subs)

    # ----- subscribers and dispatch -------------------------------------------------------

    def add_subs(self, subs: Iterable[Subscriber]) -> None:
        """Attach `subs` and re-sort the dispatch table."""
        self.subs.extend(subs)
        self._handlers = event_handlers(self.subs)

    def remove_subs(self, subs: Iterable[Subscriber]) -> None:
        """Detach `subs` (each once) and re-sort the dispatch table."""
        for sub in subs:
            if sub in self.subs:
                self.subs.remove(sub)
        self._handlers = event_handlers(self.subs)

    def publish(self, event: str) -> None:
        """Call every subscriber's handler for `event`, in `order`."""
        for handler in self._handlers[event]:
            try:
                handler(self)
            except CancelException:
                raise
            except Exception as exc:
                _name_source(exc, handler, event)
                raise

    @property
    def training(self) -> bool:
        """True in a training epoch, False in a validation epoch."""
        return self.model.training

    # ----- the step: override these in subclasses -------------------------------------------

    def predict(self) -> None:
        """Forward pass: `self.preds = model(batch[0])`."""
        self.preds = self.model(self.batch[0])

    def get_loss(self) -> None:
        """`self.loss = loss_fn(preds, batch[1])`; a failure gets a note with both shapes."""
        try:
            self.loss = self.loss_fn(self.preds, self.batch[1])
        except Exception as exc:  # free when nothing is raised: shapes are read only on failure
            _note_shapes(exc, self.preds, self.batch[1])
            raise

    def backward(self) -> None:
        """Backpropagate `self.loss` through the engine (Lightning applies its precision here)."""
        self.engine.backward(self.loss)

    def step(self) -> None:
        """Take an optimizer step."""
        self.opt.step()

    def zero_grad(self) -> None:
        """Reset the gradients."""
        self.opt.zero_grad()

    # ----- the loop ----------------------------------------------------------------------------

    def create_opt(self, lr: float | None = None) -> Any:
        """Make `self.opt` from `optim_class(model.parameters(), lr)` and return it."""
        self.opt = self.optim_class(self.model.parameters(), self.lr if lr is None else lr)
        if not (callable(getattr(self.opt, "step", None)) and callable(getattr(self.opt, "zero_grad", None))):
            raise TypeError(
                f"optim_class returned {type(self.opt).__name__}, which lacks step() and zero_grad(); "
                f"pass a torch.optim optimizer class or a callable (params, lr) -> optimizer"
            )
        return self.opt

    def prepare_fit(self, epochs: int, lr: float | None) -> None:
        """Check the inputs and set up the optimizer and epoch state (shared by both engines).

        The optimizer is made on the first fit and kept afterwards (its state survives between
        fits); `lr` sets the learning rate for this fit and the ones after it.
        """
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        train = self.dls.train
        if hasattr(train, "__len__") and len(train) == 0:
            raise ValueError(
                "the training loader is empty (len(dls.train) == 0): check the dataset and that "
                "batch_size is not larger than the dataset with drop_last=True"
            )
        if self.opt is None:
            self.create_opt(lr)
        elif lr is not None:
            set_lr(self.opt, lr)
        if lr is not None:
            self.lr = lr
        self.n_epochs = epochs
        self.epochs = range(epochs)

    def fit(
        self,
        epochs: int,
        train: bool = True,
        valid: bool = True,
        subs: Sequence[Subscriber] = (),
        lr: float | None = None,
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
            lr: learning rate for this fit (kept for later fits).
            engine: "native" (this loop) or "lightning" (a `lightning.Trainer`, see
                `nntrain.adapters`); `trainer_kwargs` go to the Trainer.
            resume: continue exactly from a checkpoint: a file, a directory (its newest loadable
                file), or "last" (the newest in the attached `CheckpointS`'s directory; with none
                on disk the fit starts from the beginning). `epochs` is the total: a run meant
                for 3 epochs resumes with `fit(3, resume=...)`. On the Lightning engine a
                Lightning checkpoint goes to the Trainer as `ckpt_path` (see `fit_lightning`).

        Returns:
            None natively; the `lightning.Trainer` on the Lightning engine.

        Raises:
            CheckpointError: the checkpoint is unreadable, incomplete or for another model.
        """
        if engine == "lightning":
            from nntrain.adapters import fit_lightning  # Lightning is imported only there

            return fit_lightning(self, epochs, train=train, valid=valid, subs=subs, lr=lr, resume=resume,
                                 **trainer_kwargs)
        if engine != "native":
            raise ValueError(f"engine must be 'native' or 'lightning', got {engine!r}")
        if trainer_kwargs:
            raise TypeError(f"fit() got Trainer options {sorted(trainer_kwargs)} but engine='native'")
        self.add_subs(subs)
        try:
            self.prepare_fit(epochs, lr)
            if resume is not None:
                self._resume = self.load_checkpoint(resume)
            self._run_scope("fit", self._fit_body, CancelFitException, train, valid)
        finally:
            self._resume = None
            self.remove_subs(subs)
        return None

    # ----- resume --------------------------------------------------------------------------------

    def load_checkpoint(self, resume: str | os.PathLike) -> dict[str, Any] | None:
        """Load model, optimizer, gradients and `global_step` from a checkpoint (see `fit(resume=)`);
        return it (its subscriber states and RNG are applied when the fit reaches its position),
        or None when `resume="last"` finds none. See `nntrain.checkpoint.restore_learner`."""
        return restore_learner(self, resume)

    def _run_scope(self, name: str, body: Callable[..., None], cancel: type[CancelException], *args: Any) -> None:
        try:
            self.publish(f"before_{name}")
            body(*args)
            self.publish(f"after_{name}")
        except cancel:
            pass
        finally:
            self.publish(f"cleanup_{name}")

    def _fit_body(self, train: bool, valid: bool) -> None:
        self.fit_valid = valid
        epochs = self.epochs
        if self._resume is not None:
            pos = self._resume["position"]
            if pos["iter"] is None:  # saved at an epoch's end: continue with the next epoch
                epochs = range(pos["epoch"] + 1, self.n_epochs)
                apply_subscriber_states(self, self._resume)
                self._resume = None
            elif not train:
                raise ValueError("a checkpoint taken inside a training pass cannot resume a fit with train=False")
            else:  # inside an epoch's training pass: `_epoch_body` skips to the position
                epochs = range(pos["epoch"], self.n_epochs)
        for self.epoch in epochs:
            if train:
                self.one_epoch(True)
            if valid:
                with torch.no_grad():
                    self.one_epoch(False)

    def one_epoch(self, training: bool) -> None:
        """Run one training or validation pass over the matching loader."""
        self.model.train(training)
        self.dl = self.dls.train if training else self.dls.valid
        self._run_scope("epoch", self._epoch_body, CancelEpochException)

    def _epoch_body(self) -> None:
        self.batch = None
        if self._resume is None:
            batches = enumerate(self.dl)
        else:
            batches, self._resume = resumed_batches(self, self._resume), None
        try:
            for self.iter, self.batch in batches:
                self.one_batch()
        except CancelException:
            raise
        except Exception as exc:  # free when nothing is raised; the batch is inspected only on failure
            _check_batch_structure(exc, self.batch, self.model.training)
            raise

    def one_batch(self) -> None:
        """Run one batch: predict, loss and (when training) backward, step, zero_grad."""
        publish = self.publish
        try:
            publish("before_batch")
            self.run_step()
            publish("after_batch")
        except CancelBatchException:
            pass
        finally:
            publish("cleanup_batch")

    def run_step(self) -> None:
        """The body of a batch, with its inner events; both engines call this."""
        publish = self.publish
        self.predict()
        publish("after_predict")
        self.get_loss()
        publish("after_loss")
        if self.model.training:
            self.backward()
            publish("after_backward")
            self.step()
            self.global_step += 1
            publish("after_step")
            self.zero_grad()

    # ----- inference ----------------------------------------------------------------------------

    def infer(self, x: torch.Tensor, single: bool = False) -> torch.Tensor:
        """The model's output for new inputs `x`, in eval mode, without grad, on the model's device.

        Args:
            x: a batch of inputs (or one input with `single=True`).
            single: `x` is one sample: add the batch dimension and remove it from the output.
        """
        param = next(self.model.parameters(), None)
        if param is not None:
            x = x.to(param.device)
        if single:
            x = x.unsqueeze(0)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                out = self.model(x)
        finally:
            self.model.train(was_training)
        return out[0] if single else out

    def lr_find(self, start_lr: float = 1e-5, mult: float = 1.25, max_lr: float = 10.0,
                max_epochs: int = 100, engine: str = "native", **trainer_kwargs: Any) -> Any:
        """Run an `LRFindS` search and put the model and optimizer back as they were.

        Returns:
            The `LRFindS` with `.lrs`, `.losses`, `.plot()` and `.suggestion()`.
        """
        from nntrain.subscribers.lr_find import lr_find  # the algorithm lives with its subscriber

        return lr_find(self, start_lr=start_lr, mult=mult, max_lr=max_lr, max_epochs=max_epochs,
                       engine=engine, **trainer_kwargs)


class MomentumLearner(Learner):
    """A `Learner` whose `zero_grad` keeps `mom * grad` instead of zeroing: gradients with momentum."""

    def __init__(
        self,
        model: nn.Module,
        dls: Any,
        loss_fn: Callable[..., torch.Tensor],
        optim_class: Callable[..., Any] = torch.optim.SGD,
        lr: float = 0.1,
        subs: Sequence[Subscriber] = (),
        mom: float = 0.85,
    ) -> None:
        super().__init__(model, dls, loss_fn, optim_class, lr, subs)
        self.mom = mom

    def zero_grad(self) -> None:
        """Scale every existing gradient by `mom` (parameters without a grad are skipped)."""
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.mom)
