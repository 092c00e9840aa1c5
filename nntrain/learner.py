"""The event loop: `Learner`, the event registry, the cancel exceptions and the dispatcher.

A fit publishes events to subscribers. Scopes nest as fit > epoch > batch; each scope fires
`before_<scope>`, runs its body, fires `after_<scope>`, and always fires `cleanup_<scope>`
(in a `finally`). Inside a batch the step fires `after_predict`, `after_loss` and, when
training, `before_backward`, `after_backward`, `before_step` and `after_step`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nntrain.checkpoint import CheckpointError, ResumePlan, resumed_batches
from nntrain.checks import (
    TARGET_KEYS,
    _check_loss,
    _describe,
    _empty_valid,
    _note_model_failure,
    _note_shapes,
    announce_resume,
    check_batch_structure,
    check_fit_args,
    check_lr,
    loader_length,
    split_batch,
)
from nntrain.devices import to_device
from nntrain.engines import Engine, NativeEngine
from nntrain.registry import ENGINES, TOOLS, resolve

__all__ = [
    "EVENTS",
    "CancelException",
    "CancelFitException",
    "CancelEpochException",
    "CancelBatchException",
    "CancelStepException",
    "Subscriber",
    "Dispatcher",
    "Engine",
    "NativeEngine",
    "Learner",
    "MomentumLearner",
    "get_lr",
    "set_lr",
    "model_device",
    "loader_length",
    "collate_preds",
    "check_batch_structure",
    "split_batch",
    "TARGET_KEYS",
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
    "before_backward",
    "after_backward",
    "before_step",
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


class CancelStepException(CancelException):
    """Skip this batch's optimizer step: raised in `before_step` (or by `Learner.step`), the step,
    `after_step` and `zero_grad` do not happen and `global_step` stays; the gradients are kept
    and the batch goes on with `after_batch`. `GradAccumS` and a skipped fp16 step use it."""


class Subscriber:
    """Base class for subscribers: define methods named after `EVENTS`, each taking the learner.

    `order` sorts subscribers (lower runs first); for `one_rank_cancels` see below. `engines`
    names the engines the subscriber runs on; on an engine that does the job itself (Lightning
    places the model on its device), a subscriber lists only the other engines and is left out
    there. `reports` marks a subscriber that only reports (metrics, progress, logs): `lr_find`
    detaches it during the search, so a search prints and logs nothing.
    """

    order: int = 0
    engines: tuple[str, ...] = ("native", "lightning")
    reports: bool = False
    one_rank_cancels: bool = True
    """Whether a cancel this subscriber raises may come from one DDP rank alone (its own data, a
    timer). Under DDP the ranks agree after each event such a subscriber handles (one small CPU
    collective), so its cancel is every rank's at the same point. False for subscribers that
    never cancel, or cancel only from values every rank shares (global metrics, step counts)."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints; none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def check_subscribers(subs: Any, where: str = "subs") -> list[Any]:
    """`subs` as a list (None: empty), each entry checked to be a subscriber instance.

    Raises:
        TypeError: `subs` is not a sequence, or an entry is a class (not an instance) or an
            object with no event method.
    """
    if subs is None:
        return []
    if isinstance(subs, (str, bytes)) or not isinstance(subs, Iterable):
        raise TypeError(f"{where} must be a list of subscribers, got {type(subs).__name__}")
    subs = list(subs)
    for i, sub in enumerate(subs):
        if isinstance(sub, type):
            raise TypeError(f"{where}[{i}] is the class {sub.__name__}, not a subscriber: pass an instance, "
                            f"{sub.__name__}(...)")
        if not any(callable(getattr(sub, event, None)) for event in EVENTS) and \
                not any(_EVENT_LIKE.match(name) for name in dir(type(sub))):  # a typo: event_handlers names it
            raise TypeError(f"{where}[{i}] is {_describe(sub)} with no event method ({', '.join(EVENTS[:3])}, ...): "
                            f"it is not a subscriber")
    return subs


def event_handlers(subs: Iterable[Subscriber]) -> dict[str, tuple[Callable[[Any], None], ...]]:
    """Map each event to the bound handlers of `subs`, sorted by `order` (stable).

    Raises:
        AttributeError: a subscriber has a method that looks like an event but is none.
    """
    ordered = sorted(subs, key=lambda s: getattr(s, "order", 0))
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


def _warn_masked(exc: BaseException, handler: Callable[[Any], None], event: str) -> None:
    """Warn about an error raised by a cleanup handler while an earlier error unwinds."""
    sub = getattr(handler, "__self__", handler)
    warnings.warn(f"{type(sub).__name__}.{event} failed while an earlier error was unwinding the fit (that error "
                  f"is raised): {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=4)


_SCOPE_OF: dict[type[CancelException], str] = {
    CancelFitException: "fit",
    CancelEpochException: "epoch",
    CancelBatchException: "batch",
}
_DEPTH = {"fit": 0, "epoch": 1, "batch": 2}
_AGREED: tuple[type[CancelException], ...] = (CancelStepException, CancelBatchException, CancelEpochException,
                                              CancelFitException)
"""The cancels ranks agree on, narrowest first: code i + 1 (0: none); the widest raised wins."""


def _cancel_code(exc: CancelException | None) -> int:
    """0 for no cancel, else the code of the widest of `_AGREED` that `exc` is (a bare
    `CancelException`: the fit's)."""
    if exc is None:
        return 0
    for code in range(len(_AGREED), 0, -1):
        if isinstance(exc, _AGREED[code - 1]):
            return code
    return len(_AGREED)


def _one_rank_events(handlers: Mapping[str, tuple[Callable[[Any], None], ...]]) -> frozenset[str]:
    """The events with a handler whose subscriber may cancel on one rank alone (`one_rank_cancels`)."""
    return frozenset(event for event, hs in handlers.items()
                     if any(getattr(getattr(h, "__self__", h), "one_rank_cancels", True) for h in hs))


def subscriber_engines(sub: Any) -> tuple[str, ...]:
    """The engines `sub` runs on (every engine for a plain object without `engines`)."""
    return tuple(getattr(sub, "engines", ("native", "lightning")))


class Dispatcher:
    """Sends events to subscribers and keeps the scopes fit > epoch > batch; every engine drives
    one through `open_scope`, `run` and `close_scope`.

    `open_scope(s)` fires `before_s`, `run(s, body)` runs the scope's body, `close_scope(s)`
    fires `after_s` (unless the scope was cancelled or failed) and always `cleanup_s`. A
    `CancelException` raised by a handler or a body cancels its scope (`CancelFitException`
    the fit, and so on); inside a cancelled scope nothing more opens and no `after_*` fires.
    With `propagate=True` (the native loop) a cancel of an enclosing scope is re-raised, so the
    Python stack unwinds to that scope; with `propagate=False` (an engine whose loop cannot be
    unwound, Lightning) the cancel is only recorded and `engine.on_cancel(scope)` is told.

    With `agree` set (several DDP ranks: `engine.agree_cancel`), each event handled by a
    subscriber with `one_rank_cancels` ends with the ranks agreeing on a cancel: every handler of
    the event runs, then the widest cancel raised on any rank is raised on all of them, so all
    ranks fire the same events and skip the same steps. Cancels raised by the learner's own
    methods (a skipped fp16 step) are not agreed: they must follow from values every rank shares.
    """

    def __init__(self, learn: Any) -> None:
        self.learn = learn
        self.handlers = event_handlers(())
        self.one_rank_events: frozenset[str] = frozenset()
        self.agree: Callable[[int], int] | None = None
        self.propagate = True
        self.reset()

    def reset(self) -> None:
        """No scope open, none cancelled (a new fit)."""
        self.open: list[str] = []
        self.cancelled: str | None = None  # the outermost cancelled scope still open

    def set_subs(self, subs: Iterable[Any]) -> None:
        """Dispatch to `subs` from now on (sorted by `order`)."""
        self.handlers = event_handlers(subs)
        self.one_rank_events = _one_rank_events(self.handlers)

    @property
    def top(self) -> str | None:
        """The innermost open scope."""
        return self.open[-1] if self.open else None

    def publish(self, event: str) -> None:
        """Call every handler of `event` in `order`; cancels propagate to the caller."""
        if self.agree is not None and event in self.one_rank_events:
            self._publish_agreed(event)
            return
        learn = self.learn
        for handler in self.handlers[event]:
            try:
                handler(learn)
            except CancelException:
                raise
            except Exception as exc:
                _name_source(exc, handler, event)
                raise

    def _publish_agreed(self, event: str) -> None:
        """`publish` when the ranks must agree: all handlers run, then the agreed cancel is raised."""
        pending: CancelException | None = None
        for handler in self.handlers[event]:
            try:
                handler(self.learn)
            except CancelException as exc:
                pending = exc if _cancel_code(exc) > _cancel_code(pending) else pending
            except Exception as exc:
                _name_source(exc, handler, event)
                raise
        pending = self._agreed(pending)
        if pending is not None:
            raise pending

    def _agreed(self, pending: CancelException | None) -> CancelException | None:
        """The widest cancel raised on any rank at this point (`pending` if it is this rank's)."""
        code = _cancel_code(pending)
        agreed = self.agree(code) if self.agree is not None else code
        if agreed == code:
            return pending
        exc = _AGREED[agreed - 1]()
        exc.add_note("raised on another rank: under DDP every rank cancels at the same point")
        return exc

    def _cancel(self, exc: CancelException, scope: str) -> None:
        target = _SCOPE_OF.get(type(exc)) or next((s for t, s in _SCOPE_OF.items() if isinstance(exc, t)), None)
        if target is None or target not in self.open:
            raise exc  # a cancel of a scope that is not open: as natively, it escapes
        if self.cancelled is None or _DEPTH[target] < _DEPTH[self.cancelled]:
            self.cancelled = target
            self.learn.engine.on_cancel(target)
        if self.propagate and target != scope:
            raise exc

    def open_scope(self, scope: str) -> bool:
        """Open `scope` and fire `before_<scope>`; False when its body must not run (it or an
        enclosing scope is cancelled; then a cancelled enclosing scope leaves it unopened)."""
        if self.cancelled is not None:
            return False
        self.open.append(scope)
        try:
            self.publish(f"before_{scope}")
        except CancelException as exc:
            self._cancel(exc, scope)
        return self.cancelled is None

    def run(self, scope: str, body: Callable[..., None], *args: Any) -> None:
        """Run the body of the open `scope`, unless a cancel silenced it."""
        if self.cancelled is not None:
            return
        try:
            body(*args)
        except CancelException as exc:
            self._cancel(exc, scope)

    def close_scope(self, scope: str, failed: bool = False) -> None:
        """Fire `after_<scope>` (not when cancelled or `failed`), then always `cleanup_<scope>`.
        A scope that is not the innermost open one is left alone (it never opened)."""
        if not self.open or self.open[-1] != scope:
            return
        try:
            if not failed and self.cancelled is None:
                try:
                    self.publish(f"after_{scope}")
                except CancelException as exc:
                    self._cancel(exc, scope)
        finally:
            self.open.pop()
            if self.cancelled == scope:
                self.cancelled = None
            self._publish_cleanup(scope, failed)

    def _publish_cleanup(self, scope: str, failed: bool = False) -> None:
        """Fire `cleanup_<scope>` to every handler; a cancel raised there (of an enclosing scope:
        `EarlyStoppingS` ends the fit once an epoch has wholly ended) takes effect after all ran.
        While an error unwinds the scope (`failed`), a cleanup's own error is a warning, so the
        first error is the one raised."""
        event = f"cleanup_{scope}"
        pending: CancelException | None = None
        learn = self.learn
        for handler in self.handlers[event]:
            try:
                handler(learn)
            except CancelException as exc:
                pending = pending or exc
            except Exception as exc:
                _name_source(exc, handler, event)
                if not failed:
                    raise
                _warn_masked(exc, handler, event)
        if self.agree is not None and event in self.one_rank_events and not failed:
            pending = self._agreed(pending)
        if pending is not None:
            self._cancel(pending, scope)

    def abort(self) -> None:
        """Fire the cleanups of every open scope, innermost first (the engine failed: a cleanup's
        own error is a warning, so the engine's error is the one raised)."""
        while self.open:
            scope = self.open.pop()
            self._publish_cleanup(scope, failed=True)
        self.cancelled = None


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

    The learner state, kept current on both engines for subscribers (the README's table):
    `model`, `opt`, `dls`, `lr`, `engine`, `mode` ("train", "valid" or "test": the pass
    running), `epoch`, `epochs` (a range), `n_epochs`, `fit_valid` (whether this fit runs
    validation passes), `dl`, `n_batches` (batches in the pass, None when the loader has no
    length), `iter` (batch index in the pass), `global_step` (optimizer steps applied so far,
    all fits), `batch`, `preds`, `loss`, `loss_grad` (what `backward` differentiates: `loss`
    unless a `before_backward` subscriber scaled it), `grad_scaling` (the fp16 `GradScaling`
    backward and step go through, or None), and `training` (`model.training`).
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
        check_lr(lr)
        self.model = model
        self.dls = dls
        self.loss_fn = loss_fn
        self.optim_class = optim_class
        self.lr = lr
        self.subs: list[Subscriber] = check_subscribers(subs)
        self.opt: Any = None
        self.engine: Engine = NativeEngine()
        self.global_step = 0
        self.epoch = 0
        self.iter = 0
        self.mode = "train"
        self.batch: Any = None
        self.n_batches: int | None = None
        self.loss_grad: Any = None
        self.grad_scaling: Any = None  # a nntrain.amp.GradScaling while fp16 training scales the loss
        self.resume_plan: ResumePlan | None = None  # the checkpoint a fit continues from, for that fit only
        self.dispatch = Dispatcher(self)
        self.dispatch.set_subs(self.subs)

    # ----- subscribers and dispatch -------------------------------------------------------

    def add_subs(self, subs: Iterable[Subscriber]) -> None:
        """Attach `subs` and re-sort the dispatch table.

        Raises:
            TypeError: an entry is not a subscriber instance (see `check_subscribers`).
        """
        self.subs.extend(check_subscribers(subs))
        self.dispatch.set_subs(self.subs)

    def remove_subs(self, subs: Iterable[Subscriber]) -> None:
        """Detach `subs` (each once) and re-sort the dispatch table."""
        for sub in subs or ():
            if sub in self.subs:
                self.subs.remove(sub)
        self.dispatch.set_subs(self.subs)

    def publish(self, event: str) -> None:
        """Call every subscriber's handler for `event`, in `order`."""
        self.dispatch.publish(event)

    @property
    def training(self) -> bool:
        """True in a training epoch, False in a validation epoch."""
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
            _note_model_failure(exc, inputs, self.model.training)
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
        if loader_length(train) == 0:
            raise ValueError(
                "the training loader is empty (len(dls.train) == 0): check the dataset and that "
                "batch_size is not larger than the dataset with drop_last=True"
            )
        for name, dl in (("train", train), ("valid", self.dls.valid)):
            if isinstance(dl, Iterator):  # a generator or iterator: used up after one pass
                raise TypeError(f"dls.{name} is an iterator ({type(dl).__name__}): it would be used up after one "
                                f"pass and the next epochs would train on nothing; give a DataLoader or another "
                                f"object that can be iterated again")
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
            engine: "native" (this loop) or a registered engine ("lightning": a
                `lightning.Trainer`, see `nntrain.adapters`); `trainer_kwargs` go to the Trainer.
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
        subs = check_subscribers(subs)
        check_fit_args(lr, resume)
        if engine != "native":
            run = resolve(ENGINES, engine, "engine")
            return run(self, epochs, train=train, valid=valid, subs=subs, lr=lr, resume=resume, **trainer_kwargs)
        if trainer_kwargs:
            raise TypeError(f"fit() got Trainer options {sorted(trainer_kwargs)} but engine='native'")
        self._check_engines([*self.subs, *subs])
        self.add_subs(subs)
        try:
            self.prepare_fit(epochs, lr)
            if resume is not None:
                self.resume_plan = ResumePlan.restore(self, resume, train)
                if lr is not None:  # the checkpoint's optimizer state carried its lr: this fit's wins
                    set_lr(self.opt, lr)
                announce_resume(self.resume_plan, self.engine.rank)
            valid = valid and not _empty_valid(self.dls.valid)
            self.fit_valid = valid  # before before_fit: subscribers check what this fit logs
            self._start_native()
            self._scope("fit", self._fit_body, train, valid)
        finally:
            self.resume_plan = None
            self.remove_subs(subs)
        return None

    def _check_engines(self, subs: Sequence[Any]) -> None:
        for sub in subs:
            if "native" not in subscriber_engines(sub):
                raise ValueError(f"{type(sub).__name__} supports the engines {subscriber_engines(sub)} only; "
                                 f"remove it from the learner's subs or fit with one of those engines")

    def _start_native(self) -> None:
        if not isinstance(self.engine, NativeEngine):
            self.engine = NativeEngine()
        self.dispatch.propagate = True
        self.dispatch.agree = None
        self.dispatch.reset()

    def _scope(self, scope: str, body: Callable[..., None], *args: Any) -> None:
        """One scope of the native loop: open, body, close (cleanup even on error)."""
        dispatch = self.dispatch
        ok = False
        try:
            if dispatch.open_scope(scope):
                dispatch.run(scope, body, *args)
            ok = True
        finally:
            dispatch.close_scope(scope, failed=not ok)

    def _fit_body(self, train: bool, valid: bool) -> None:
        epochs = self.epochs
        plan = self.resume_plan
        if plan is not None:
            epochs = range(plan.start_epoch, self.n_epochs)
            if not plan.inside_epoch:  # saved at an epoch's end: continue with the next epoch
                plan.apply_states(self)
        for self.epoch in epochs:
            if train:
                self.one_epoch(True)
            if valid:
                with torch.no_grad():
                    self.one_epoch(False)

    def one_epoch(self, training: bool, dl: Any = None, mode: str | None = None) -> None:
        """Run one training or evaluation pass over the matching loader (or `dl`)."""
        self.model.train(training)
        self.mode = mode or ("train" if training else "valid")
        self.dl = dl if dl is not None else self.dls.train if training else self.dls.valid
        self.n_batches = loader_length(self.dl)
        self._scope("epoch", self._epoch_body)

    def _epoch_body(self) -> None:
        self.batch = None
        plan = self.resume_plan
        if plan is not None and plan.inside_epoch and self.model.training and not plan.applied:
            batches = resumed_batches(self, plan)
        else:
            batches = enumerate(self.dl)
        try:
            for self.iter, self.batch in batches:
                self._scope("batch", self.run_step)
        except CancelException:
            raise
        except Exception as exc:  # free when nothing is raised; the batch is inspected only on failure
            check_batch_structure(exc, self.batch, self.mode)
            raise

    def one_batch(self) -> None:
        """Run one batch: predict, loss and (when training) backward, step, zero_grad."""
        self._scope("batch", self.run_step)

    def run_step(self) -> None:
        """The body of a batch, with its inner events; both engines call this."""
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

    # ----- evaluation and inference --------------------------------------------------------------

    def evaluate(self, dl: Any = None, subs: Sequence[Subscriber] = (), engine: str = "native",
                 **trainer_kwargs: Any) -> dict[str, float]:
        """One evaluation pass over `dl` (mode "test"; the validation loader, mode "valid", when
        None) with the fit and epoch events, as Keras's `evaluate` or fastai's `validate`.

        Returns:
            The values subscribers logged for the pass by name (`MetricsS`: `test/loss`,
            `test/<metric>`); the same as `trainer.test` / `trainer.validate` return.
        """
        if engine != "native":
            return resolve(TOOLS, f"evaluate:{engine}", "tool")(self, dl, subs=subs, **trainer_kwargs)
        if trainer_kwargs:
            raise TypeError(f"evaluate() got Trainer options {sorted(trainer_kwargs)} but engine='native'")
        mode = "valid" if dl is None else "test"
        self._check_engines([*self.subs, *subs])
        self.add_subs(subs)
        try:
            if self.opt is None:
                self.create_opt()
            self.n_epochs, self.epochs, self.epoch, self.fit_valid = 1, range(1), 0, True
            self._start_native()
            self.engine.logged = {}
            self._scope("fit", self._evaluate_body, dl, mode)
        finally:
            self.remove_subs(subs)
        return {k: v for k, v in self.engine.logged.items() if k.startswith(f"{mode}/")}

    def _evaluate_body(self, dl: Any, mode: str) -> None:
        with torch.no_grad():
            self.one_epoch(False, dl, mode)

    def get_preds(self, dl: Any = None, engine: str = "native", **trainer_kwargs: Any
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's predictions over `dl` (default: the validation loader) in eval mode,
        without grad and without events, with the targets where batches are `(inputs, targets)`.

        Returns:
            `(preds, targets)`, each concatenated over the batches (targets None if there are none).
        """
        if engine != "native":
            return resolve(TOOLS, f"get_preds:{engine}", "tool")(self, dl, **trainer_kwargs)
        dl = self.dls.valid if dl is None else dl
        device = model_device(self.model)
        was_training = self.model.training
        self.model.eval()
        outputs = []
        try:
            with torch.no_grad():
                for self.iter, batch in enumerate(dl):
                    self.batch = to_device(batch, device)
                    outputs.append(self.predict_batch())
        finally:
            self.model.train(was_training)
        return collate_preds(outputs)

    def predict_batch(self) -> tuple[torch.Tensor, Any]:
        """`predict` on `self.batch`; returns `(preds, targets or None)` (both engines' predict
        step). A bare tensor batch is the inputs alone."""
        batch = self.batch
        if not isinstance(batch, (tuple, list, Mapping)):
            batch = self.batch = (batch,)
        self.predict()
        return self.preds, self.split_batch(batch)[1]

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
        return resolve(TOOLS, "lr_find", "tool")(self, start_lr=start_lr, mult=mult, max_lr=max_lr,
                                                 max_epochs=max_epochs, engine=engine, **trainer_kwargs)

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
        return resolve(TOOLS, "fit_one_cycle", "tool")(self, epochs, lr_max, pct_start=pct_start, div=div,
                                                       div_final=div_final, moms=moms, **fit_kwargs)

    def save(self, path: str | os.PathLike, with_opt: bool = True) -> Any:
        """Write the model's weights (and the optimizer state) to `path` atomically; returns the path.
        `load` reads it back; a `SaveBestS` file is one too."""
        from nntrain.checkpoint import save_weights

        return save_weights(self, path, with_opt=with_opt)

    def load(self, path: str | os.PathLike, with_opt: bool = True, strict: bool = True) -> None:
        """Load weights (and the optimizer state, when the file has it and `with_opt`) written by
        `save`, `SaveBestS` or a native checkpoint.

        Raises:
            CheckpointError: the file is missing, unreadable or holds no model weights.
        """
        from nntrain.checkpoint import load_weights

        load_weights(self, path, with_opt=with_opt, strict=strict)


def model_device(model: nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def collate_preds(outputs: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate per-batch `(preds, targets)` pairs into one `(preds, targets)`."""
    if not outputs:
        raise ValueError("the loader yielded no batches: there is nothing to predict")
    preds = torch.cat([p for p, _ in outputs])
    targets = [t for _, t in outputs]
    if any(t is None or not isinstance(t, torch.Tensor) for t in targets):
        return preds, None
    return preds, torch.cat(targets)


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
