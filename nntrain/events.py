"""The events a fit publishes, the cancel exceptions, and the `Subscriber` base.

A fit publishes events to subscribers. Scopes nest as fit > epoch > batch; each scope fires
`before_<scope>`, runs its body, fires `after_<scope>`, and always fires `cleanup_<scope>` (in a
`finally`). Inside a batch the step fires `after_predict`, `after_loss` and, when training,
`before_backward`, `after_backward`, `before_step` and `after_step`. `loop_pseudocode()` writes
the loop out with every event in its place.

`Subscriber` declares every convention a subscriber may use, each with its default; an object
that is not a `Subscriber` but has event methods works too and gets the same defaults
(`declared`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "EVENTS",
    "EVENT_DOCS",
    "CancelException",
    "CancelFitException",
    "CancelEpochException",
    "CancelBatchException",
    "CancelStepException",
    "Subscriber",
    "check_roles",
    "declared",
    "subscriber_engines",
    "check_subscribers",
    "event_handlers",
    "loop_pseudocode",
]

EVENT_DOCS: dict[str, str] = {
    "before_fit": "the fit starts: `n_epochs`, `epochs`, `fit_valid`, `opt` and `engine` are set.",
    "before_epoch": "a pass starts: `mode`, `epoch`, `dl` and `n_batches` are set, `model.training` matches.",
    "before_batch": "a batch starts: `iter` and `batch` are set (a subscriber may replace `batch`).",
    "after_predict": "`preds` holds the model's output.",
    "after_loss": "`loss` holds the batch's loss (a subscriber may replace it).",
    "before_backward": "training only: `loss_grad` is what backward differentiates (a subscriber may scale it).",
    "after_backward": "training only: the gradients are in `.grad`, unscaled.",
    "before_step": "training only: the optimizer step is next (`CancelStepException` skips it).",
    "after_step": "training only: the step was applied and `global_step` counts it; `zero_grad` is next.",
    "after_batch": "the batch ended normally (not after a cancel or an error).",
    "cleanup_batch": "the batch ended in any way (also after a cancel or an error).",
    "after_epoch": "the pass ended normally: the pass's values are logged here (`learn.logs`).",
    "cleanup_epoch": "the pass ended in any way.",
    "after_fit": "the fit ended normally.",
    "cleanup_fit": "the fit ended in any way; afterwards the learner holds no autograd graph.",
}
"""Every event a subscriber may handle, in the order a training batch meets them, with what
holds when it fires."""

EVENTS: tuple[str, ...] = tuple(EVENT_DOCS)
"""The event names (the keys of `EVENT_DOCS`)."""

EVENT_LIKE = re.compile(r"^(before|after|cleanup)_")
"""A method name that looks like an event handler (checked against `EVENTS`)."""


class CancelException(Exception):
    """Base of the flow-control exceptions; never an error."""


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

    The class attributes and methods below are every convention the library reads from a
    subscriber; each default is what a subscriber that does not declare it gets (a plain object
    with event methods too, see `declared`).
    """

    order: int = 0
    """Sort key: lower runs first at every event (stable among equals)."""

    engines: tuple[str, ...] = ("native", "lightning")
    """The engines it runs on. On an engine that does its job itself (Lightning places the model on
    its device), a subscriber lists only the others and says what it needs in `engine_needs`."""

    reports: bool = False
    """It only reports (metrics, progress, logs): `lr_find` detaches it during the search."""

    one_rank_cancels: bool = True
    """A cancel it raises may come from one DDP rank alone (its own data, a timer). Under DDP the
    ranks agree after each event such a subscriber handles (one small CPU collective), so its
    cancel is every rank's at the same point. False for subscribers that never cancel, or cancel
    only from values every rank shares (global metrics, step counts)."""

    role: str | None = None
    """The job it does that only one subscriber may do in a fit ("gradient accumulation",
    "gradient clipping", "mixed precision", "device placement"): two attached subscribers with
    the same role are refused before the fit, naming both (together they would do the job twice)."""

    needed_on_resume: bool = False
    """Its absence changes a resumed run's numbers (a schedule, accumulation, clipping, mixed
    precision, an early-stop count): a resume from a checkpoint that holds its state is refused
    when no attached subscriber takes that state. False: the state is dropped with a warning."""

    shows_rows: bool = False
    """It shows each pass's logged values itself (a progress display): `MetricsS` then prints no row."""

    steps_every: int = 1
    """The optimizer steps once every `steps_every` training batches while it is attached
    (`GradAccumS`); schedules count steps with the largest."""

    checkpoint_dir: str | os.PathLike[str] | None = None
    """The directory it writes checkpoints to: `fit(resume="last")` looks there."""

    state_key: str | None = None
    """The key of its `state_dict` in checkpoints; None: its class name, numbered `#1`, `#2` for
    the second and third of a class. Set it to keep the state through a rename."""

    def logged_names(self, learn: Any) -> Sequence[str]:
        """The names it logs through `learn.log` in this fit (`valid/loss`): what a monitor may watch."""
        return ()

    def engine_needs(self) -> dict[str, Any]:
        """What it asks of an engine that does its job itself (`{"device": ...}`,
        `{"tensorboard_dir": ...}`); read when it does not run on that engine."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints; none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


_DEFAULTS = Subscriber()


def declared(sub: Any, name: str) -> Any:
    """`sub`'s convention `name` (an attribute or bound method of `Subscriber`), or the
    `Subscriber` default for an object that does not declare it."""
    return getattr(sub, name, getattr(_DEFAULTS, name))


def subscriber_engines(sub: Any) -> tuple[str, ...]:
    """The engines `sub` runs on."""
    return tuple(declared(sub, "engines"))


def _describe(x: Any) -> str:
    return f"a {type(x).__name__}"


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
            raise TypeError(
                f"{where}[{i}] is the class {sub.__name__}, not a subscriber: pass an instance, {sub.__name__}(...)"
            )
        if not any(callable(getattr(sub, event, None)) for event in EVENTS) and not any(
            EVENT_LIKE.match(name) for name in dir(type(sub))
        ):  # a typo: event_handlers names it
            raise TypeError(
                f"{where}[{i}] is {_describe(sub)} with no event method ({', '.join(EVENTS[:3])}, ...): "
                f"it is not a subscriber"
            )
    return subs


def check_roles(subs: Iterable[Any], origins: dict[int, str] | None = None) -> None:
    """Refuse two subscribers with the same `role` (see `Subscriber.role`); `origins` describes
    subscribers made from something else (a Trainer flag), by `id`.

    Raises:
        ValueError: naming both subscribers, the role, and what to keep.
    """
    seen: dict[str, Any] = {}
    origins = origins or {}

    def name(sub: Any) -> str:
        where = origins.get(id(sub))
        return type(sub).__name__ + (f" ({where})" if where else "")

    for sub in subs:
        role = declared(sub, "role")
        if role is None:
            continue
        if role in seen:
            raise ValueError(
                f"{name(seen[role])} and {name(sub)} both do {role}: together they would do it twice; keep one of them"
            )
        seen[role] = sub


def event_handlers(subs: Iterable[Any]) -> dict[str, tuple[Callable[[Any], None], ...]]:
    """Map each event to the bound handlers of `subs`, sorted by `order` (stable).

    Raises:
        AttributeError: a subscriber has a method that looks like an event but is none.
    """
    ordered = sorted(subs, key=lambda s: declared(s, "order"))
    for sub in ordered:
        for name in dir(type(sub)):
            if EVENT_LIKE.match(name) and name not in EVENTS and callable(getattr(sub, name)):
                raise AttributeError(
                    f"{type(sub).__name__}.{name} looks like an event handler but '{name}' is not an "
                    f"event. Valid events: {', '.join(EVENTS)}. Rename the method (a leading "
                    f"underscore marks a helper)."
                )
    return {event: tuple(h for h in (getattr(s, event, None) for s in ordered) if h is not None) for event in EVENTS}


_LOOP = """\
before_fit
for epoch in epochs:
    for mode in ("train", "valid"):  # a pass; "valid" runs without grad
        before_epoch
        for iter, batch in enumerate(dl):
            before_batch
            preds = predict(batch);      after_predict
            loss = get_loss(preds);      after_loss
            if training:
                loss_grad = loss;        before_backward
                backward(loss_grad);     after_backward
                                         before_step
                step(); global_step += 1; after_step
                zero_grad()
            after_batch
            cleanup_batch                # always, also after a cancel or an error
        after_epoch
        cleanup_epoch                    # always
after_fit
cleanup_fit                              # always"""


def loop_pseudocode(with_docs: bool = False) -> str:
    """The loop as pseudocode with each event in its place; with `with_docs`, followed by the
    list of events and what holds when each fires (`EVENT_DOCS`)."""
    if not with_docs:
        return _LOOP
    return _LOOP + "\n\n" + "\n".join(f"{event}: {doc}" for event, doc in EVENT_DOCS.items())
