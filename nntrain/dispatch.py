"""`Dispatcher`: sends events to subscribers and keeps the scopes fit > epoch > batch.

Every engine drives one: the native loop (`nntrain.engines.NativeEngine`) and the Lightning
bridge call the same `open_fit` / `open_epoch` / `open_batch`, `run` and `close_*` methods.
These scope methods are the only code that writes the learner's loop position (`n_epochs`,
`epochs`, `fit_valid`, `mode`, `epoch`, `dl`, `n_batches`, `iter`), and the only place where a
resume plan's saved subscriber states and RNG are applied: after `before_fit` for a checkpoint
taken at an epoch's end, and just before the first training batch past the saved position for
one taken inside an epoch (at the pass's end when no batch is left).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nntrain.events import (
    CancelBatchException,
    CancelEpochException,
    CancelException,
    CancelFitException,
    CancelStepException,
    check_roles,
    declared,
    event_handlers,
)

__all__ = ["Dispatcher"]

_BEFORE = {scope: f"before_{scope}" for scope in ("fit", "epoch", "batch")}
_AFTER = {scope: f"after_{scope}" for scope in ("fit", "epoch", "batch")}
_CLEANUP = {scope: f"cleanup_{scope}" for scope in ("fit", "epoch", "batch")}

_SCOPE_OF: dict[type[CancelException], str] = {
    CancelFitException: "fit",
    CancelEpochException: "epoch",
    CancelBatchException: "batch",
}
_DEPTH = {"fit": 0, "epoch": 1, "batch": 2}
_AGREED: tuple[type[CancelException], ...] = (
    CancelStepException,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
)
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
    return frozenset(
        event
        for event, hs in handlers.items()
        if any(declared(getattr(h, "__self__", h), "one_rank_cancels") for h in hs)
    )


def _name_source(exc: BaseException, handler: Callable[[Any], None], event: str) -> None:
    """Attach the failing subscriber and event to `exc` (once), keeping its type and args."""
    sub = getattr(handler, "__self__", handler)
    note = f"raised in subscriber {type(sub).__name__} while handling event '{event}'"
    if note not in getattr(exc, "__notes__", []) and hasattr(exc, "add_note"):
        exc.add_note(note)


def _warn_masked(exc: BaseException, handler: Callable[[Any], None], event: str) -> None:
    """Warn about an error raised by a cleanup handler while an earlier error unwinds."""
    sub = getattr(handler, "__self__", handler)
    warnings.warn(
        f"{type(sub).__name__}.{event} failed while an earlier error was unwinding the fit (that error "
        f"is raised): {type(exc).__name__}: {exc}",
        RuntimeWarning,
        stacklevel=4,
    )


class Dispatcher:
    """Sends events to a learner's subscribers and keeps its scopes.

    `open_fit`/`open_epoch`/`open_batch` set the loop position and fire `before_<scope>`; `run`
    runs a scope's body; `close_scope` fires `after_<scope>` (unless the scope was cancelled or
    failed) and always `cleanup_<scope>`. A `CancelException` raised by a handler or a body
    cancels its scope (`CancelFitException` the fit, and so on); inside a cancelled scope nothing
    more opens and no `after_*` fires. With `propagate=True` (the native loop) a cancel of an
    enclosing scope is re-raised, so the Python stack unwinds to that scope; with
    `propagate=False` (an engine whose loop cannot be unwound, Lightning) the cancel is only
    recorded and `engine.on_cancel(scope)` is told.

    With `agree` set (several DDP ranks: `engine.agree_cancel`), each event handled by a
    subscriber with `one_rank_cancels` ends with the ranks agreeing on a cancel: every handler of
    the event runs, then the widest cancel raised on any rank is raised on all of them. Cancels
    raised by the learner's own methods (a skipped fp16 step) are not agreed: they must follow
    from values every rank shares.
    """

    def __init__(self, learn: Any) -> None:
        self.learn = learn
        self.handlers = event_handlers(())
        self.subs: list[Any] = []  # the subscribers dispatched to (`set_subs`)
        self.one_rank_events: frozenset[str] = frozenset()
        self.agree: Callable[[int], int] | None = None
        self.propagate = True
        self.resume: Any = None  # the ResumePlan whose states are still to apply in this fit
        self.reset()

    def reset(self, propagate: bool = True, agree: Callable[[int], int] | None = None, resume: Any = None) -> None:
        """A new fit: no scope open, none cancelled; how cancels travel (`propagate`, `agree`) and
        the resume plan whose subscriber states and RNG are still to be applied."""
        self.open: list[str] = []
        self.cancelled: str | None = None  # the outermost cancelled scope still open
        self.propagate = propagate
        self.agree = agree
        self.resume = resume
        self._logs_epoch: int | None = None

    def set_subs(self, subs: Iterable[Any], origins: dict[int, str] | None = None) -> None:
        """Dispatch to `subs` from now on (sorted by `order`).

        Raises:
            AttributeError: a misspelt handler (see `event_handlers`).
            ValueError: two subscribers with the same role (see `check_roles`; `origins` names
                those made from a Trainer flag).
        """
        subs = list(subs)
        check_roles(subs, origins)
        self.handlers = event_handlers(subs)
        self.subs = subs  # what checkpoints save and a resume gives states to (a Trainer flag's recipes too)
        self.one_rank_events = _one_rank_events(self.handlers)

    @property
    def top(self) -> str | None:
        """The innermost open scope."""
        return self.open[-1] if self.open else None

    # ----- events ---------------------------------------------------------------------------------

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

    # ----- scopes: the only writers of the loop position --------------------------------------------

    def open_fit(self, n_epochs: int, fit_valid: bool, first_epoch: int = 0) -> bool:
        """Open the fit of `n_epochs` epochs (`fit_valid`: whether it runs validation passes;
        `first_epoch`: the epoch it starts at, past 0 when it resumes) and fire `before_fit`; then
        apply a resume plan saved at an epoch's end. False when the fit body must not run."""
        learn = self.learn
        learn.n_epochs, learn.epochs, learn.fit_valid = n_epochs, range(n_epochs), fit_valid
        learn.epoch, learn.finished = first_epoch, False
        learn.logs = {}
        ok = self.open_scope("fit")
        plan = self.resume
        if ok and plan is not None and not plan.inside_epoch:
            self._apply_resume()
        return ok

    def open_epoch(self, mode: str, epoch: int, dl: Any, n_batches: int | None) -> bool:
        """Open the `mode` pass ("train", "valid" or "test") of `epoch` over `dl` (`n_batches`
        batches, None when unknown) and fire `before_epoch`. The values `learn.logs` holds are
        the current epoch's: a new epoch starts them empty."""
        learn = self.learn
        learn.mode, learn.epoch, learn.dl, learn.n_batches = mode, epoch, dl, n_batches
        learn.batch = None
        if epoch != self._logs_epoch:
            learn.logs, self._logs_epoch = {}, epoch
        return self.open_scope("epoch")

    def open_batch(self, i: int, batch: Any) -> bool:
        """Open batch `i` of the pass (`batch` as the loader yielded it) and fire `before_batch`.
        The first training batch past a resume plan's saved position first gets the saved
        subscriber states and RNG."""
        learn = self.learn
        if self.resume is not None and self.resume.inside_epoch and learn.mode == "train":
            self._apply_resume()
        learn.iter, learn.batch = i, batch
        return self.open_scope("batch")

    def _apply_resume(self) -> None:
        plan, self.resume = self.resume, None
        plan.apply_states(self.learn)

    def open_scope(self, scope: str) -> bool:
        """Open `scope` and fire `before_<scope>`; False when its body must not run (it or an
        enclosing scope is cancelled; then a cancelled enclosing scope leaves it unopened)."""
        if self.cancelled is not None:
            return False
        self.open.append(scope)
        try:
            self.publish(_BEFORE[scope])
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
        A scope that is not the innermost open one is left alone (it never opened). A training
        pass that ends before any batch past a resume plan's saved position (the checkpoint was
        taken after its last batch) first gets the saved states."""
        if not self.open or self.open[-1] != scope:
            return
        plan = self.resume
        if scope == "epoch" and plan is not None and plan.inside_epoch and self.learn.mode == "train" and not failed:
            self._apply_resume()  # a training pass that ended before any batch past the saved position
        try:
            if not failed and self.cancelled is None:
                try:
                    self.publish(_AFTER[scope])
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
        event = _CLEANUP[scope]
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
