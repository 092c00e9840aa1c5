"""Engines: the `Engine` protocol (what the loop and subscribers get from the engine running a
fit), the `Runner` protocol (what `Learner.fit`, `evaluate` and `get_preds` drive), and the
native engine, which owns the native loop. The Lightning engine is `nntrain.adapters`'.

`ENGINES` names them for `learn.fit(engine=...)`; an entry is `"module:attribute"`, imported on
first use, so nothing here imports the bridge.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from nntrain.checkpoint_state import native_checkpoint
from nntrain.checks import check_batch_structure, loader_length
from nntrain.devices import model_device, to_device
from nntrain.events import CancelException, subscriber_engines
from nntrain.optim import LR
from nntrain.resume import ResumePlan, resumed_batches

__all__ = ["Engine", "Runner", "NativeEngine", "ENGINES", "register_engine", "resolve_engine", "collate_preds"]


class Engine(Protocol):
    """What the loop and subscribers get from the engine running a fit (`learn.engine`).

    Subscribers ask the engine, never its name: `rank`, `backward`, `step`, `log_metrics` (a
    row's values by name, e.g. `valid/loss`), `agree_cancel` (the ranks' common cancel),
    `save_checkpoint`, `tensorboard_logger`, and what the engine does itself (`precision`: a
    reduced precision it runs, e.g. "16-mixed", or None; `saves_on_interrupt`,
    `resumes_after_last_batch`, `runs_compiled_steps`; `shows_progress`: it draws its own
    progress display, a Lightning progress bar, which then wins: `ProgressS` draws nothing and
    `MetricsS` prints no rows).
    """

    name: str
    rank: int
    precision: str | None
    shows_progress: bool
    saves_on_interrupt: bool
    resumes_after_last_batch: bool
    runs_compiled_steps: bool

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`."""

    def step(self, opt: Any) -> None:
        """Take the optimizer step."""

    def on_cancel(self, scope: str) -> None:
        """A cancel of `scope` was recorded."""

    def agree_cancel(self, code: int) -> int:
        """The widest cancel code raised at this point on any rank (`Dispatcher.agree`)."""

    def log_metrics(self, values: dict[str, float]) -> None:
        """Record values by name (`train/loss`, `valid/accuracy`) where the engine keeps them."""

    def save_checkpoint(self, stem: Any, learner_state: dict[str, Any], learn: Any) -> Any:
        """Write a checkpoint at `stem` plus the engine's suffix; return its path."""

    def tensorboard_logger(self) -> Any:
        """A logger a TensorBoard subscriber should write through, or None."""


class Runner(Protocol):
    """What `Learner.fit`, `evaluate` and `get_preds` drive, inside the one envelope they share
    (subscribers attached, inputs checked, optimizer made, resume restored; then detached and no
    autograd graph kept). Each engine's runner owns its loop and drives the learner's
    `Dispatcher` scopes."""

    def check(self, learn: Any, subs: list[Any], options: dict[str, Any]) -> None:
        """Refuse, before anything runs, subscribers or options this engine cannot honour."""

    def restore(self, learn: Any, resume: Any, epochs: int, train: bool) -> ResumePlan | None:
        """The resume plan for `resume` (see `ResumePlan.restore`)."""

    def fit(
        self,
        learn: Any,
        epochs: int,
        plan: ResumePlan | None,
        train: bool,
        valid: bool,
        lr: LR | None,
        options: dict[str, Any],
    ) -> Any:
        """Run the fit (`Learner.fit` returns None whatever it returns)."""

    def evaluate(self, learn: Any, dl: Any, mode: str, options: dict[str, Any]) -> None:
        """One evaluation pass over `dl` in `mode` ("valid" or "test") with the fit and epoch events."""

    def get_preds(self, learn: Any, dl: Any, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's predictions (and targets) over `dl`, in eval mode, without events."""


class NativeEngine:
    """The learner's own loop: plain autograd, cancels unwind the Python stack. It is both the
    engine subscribers see during a native fit and the runner that runs it."""

    name = "native"
    precision = None
    shows_progress = False
    saves_on_interrupt = True
    resumes_after_last_batch = True
    runs_compiled_steps = True

    @property
    def rank(self) -> int:
        """This process's rank in `torch.distributed` (0 when it is not initialised)."""
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    # ----- the Engine protocol ----------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """Call `loss.backward()`."""
        loss.backward()

    def step(self, opt: Any) -> None:
        """Call `opt.step()`."""
        opt.step()

    def on_cancel(self, scope: str) -> None:
        """Nothing to do: the exception unwinds the loop."""

    def agree_cancel(self, code: int) -> int:
        """One process: its own cancel."""
        return code

    def log_metrics(self, values: dict[str, float]) -> None:
        """Nothing beyond `learn.logs`, where `Learner.log` keeps them."""

    def save_checkpoint(self, stem: Any, learner_state: dict[str, Any], learn: Any) -> Any:
        """A native checkpoint `<stem>.pt`: model and optimizer state plus `learner_state`."""
        from nntrain.checkpoint import save_checkpoint

        return save_checkpoint(native_checkpoint(learn, learner_state), f"{stem}.pt")

    def tensorboard_logger(self) -> Any:
        """None: a TensorBoard subscriber opens its own writer."""
        return None

    # ----- the Runner protocol: the native loop ---------------------------------------------------

    def check(self, learn: Any, subs: list[Any], options: dict[str, Any]) -> None:
        """Refuse Trainer options and subscribers that do not run natively."""
        if options:
            raise TypeError(f"got Trainer options {sorted(options)} but engine='native'")
        for sub in subs:
            if "native" not in subscriber_engines(sub):
                raise ValueError(
                    f"{type(sub).__name__} supports the engines {subscriber_engines(sub)} only; "
                    f"remove it from the learner's subs or fit with one of those engines"
                )

    def restore(self, learn: Any, resume: Any, epochs: int, train: bool) -> ResumePlan | None:
        """`ResumePlan.restore` (a Lightning checkpoint is refused: it resumes under Lightning)."""
        return ResumePlan.restore(learn, resume, epochs, train)

    def _start(self, learn: Any, plan: ResumePlan | None = None) -> None:
        learn.engine = self
        learn.dispatch.reset(propagate=True, agree=None, resume=plan)

    def fit(
        self,
        learn: Any,
        epochs: int,
        plan: ResumePlan | None,
        train: bool,
        valid: bool,
        lr: LR | None,
        options: dict[str, Any],
    ) -> None:
        """The native loop: each epoch a training pass, then a validation pass without grad."""
        self._start(learn, plan)
        start = plan.start_epoch if plan is not None else 0
        self._scope(
            learn,
            "fit",
            lambda: learn.dispatch.open_fit(epochs, valid, start),
            self._fit_body,
            learn,
            start,
            epochs,
            plan,
            train,
            valid,
        )

    def _fit_body(self, learn: Any, start: int, epochs: int, plan: ResumePlan | None, train: bool, valid: bool) -> None:
        dls = learn.dls
        for epoch in range(start, epochs):
            if train:
                self.one_pass(learn, "train", epoch, dls.train, plan if epoch == start else None)
            if valid:
                with torch.no_grad():
                    self.one_pass(learn, "valid", epoch, dls.valid)

    def one_pass(self, learn: Any, mode: str, epoch: int, dl: Any, plan: ResumePlan | None = None) -> None:
        """Run the `mode` pass of `epoch` over `dl` (continuing `plan`'s position inside it)."""
        learn.model.train(mode == "train")
        self._scope(
            learn,
            "epoch",
            lambda: learn.dispatch.open_epoch(mode, epoch, dl, loader_length(dl)),
            self._batches,
            learn,
            dl,
            plan,
        )

    def _batches(self, learn: Any, dl: Any, plan: ResumePlan | None) -> None:
        batches = resumed_batches(dl, plan) if plan is not None and plan.inside_epoch else enumerate(dl)
        dispatch, run_step = learn.dispatch, learn.run_step
        try:
            for i, batch in batches:
                ok = False
                try:
                    if dispatch.open_batch(i, batch):
                        dispatch.run("batch", run_step)
                    ok = True
                finally:
                    dispatch.close_scope("batch", failed=not ok)
        except CancelException:
            raise
        except Exception as exc:  # free when nothing is raised; the batch is inspected only on failure
            check_batch_structure(exc, learn.batch, learn.mode)
            raise

    @staticmethod
    def _scope(learn: Any, scope: str, open_: Callable[[], bool], body: Callable[..., None], *args: Any) -> None:
        """One scope: `open_()` it, run its body unless cancelled, close it (cleanup even on error)."""
        dispatch = learn.dispatch
        ok = False
        try:
            if open_():
                dispatch.run(scope, body, *args)
            ok = True
        finally:
            dispatch.close_scope(scope, failed=not ok)

    def evaluate(self, learn: Any, dl: Any, mode: str, options: dict[str, Any]) -> None:
        """One pass in `mode` over `dl` without grad, as the only epoch of a one-epoch fit."""
        self._start(learn)
        self._scope(learn, "fit", lambda: learn.dispatch.open_fit(1, True), self._evaluate_body, learn, dl, mode)

    def _evaluate_body(self, learn: Any, dl: Any, mode: str) -> None:
        with torch.no_grad():
            self.one_pass(learn, mode, 0, dl)

    def get_preds(self, learn: Any, dl: Any, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every batch of `dl` through `learn.predict_batch`, on the model's device, without grad."""
        device = model_device(learn.model)
        was_training = learn.model.training
        learn.model.eval()
        outputs = []
        try:
            with torch.no_grad():
                for batch in dl:
                    learn.batch = to_device(batch, device)
                    outputs.append(learn.predict_batch())
        finally:
            learn.model.train(was_training)
        return collate_preds(outputs)


def collate_preds(outputs: Iterable[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate per-batch `(preds, targets)` pairs into one `(preds, targets)`."""
    outputs = list(outputs)
    if not outputs:
        raise ValueError("the loader yielded no batches: there is nothing to predict")
    preds = torch.cat([p for p, _ in outputs])
    targets = [t for _, t in outputs]
    if any(t is None or not isinstance(t, torch.Tensor) for t in targets):
        return preds, None
    return preds, torch.cat(targets)


ENGINES: dict[str, str | Callable[[], Any]] = {
    "native": NativeEngine,
    "lightning": "nntrain.adapters:LightningRunner",
}
"""Engine name -> a factory of its `Runner` (a callable or `"module:attribute"`, imported on first use)."""


def register_engine(name: str, runner: str | Callable[[], Any]) -> None:
    """Make `learn.fit(engine=name)` run the `Runner` that `runner()` makes."""
    ENGINES[name] = runner


def resolve_engine(name: str) -> Any:
    """A new runner of the engine registered as `name`.

    Raises:
        ValueError: nothing is registered under `name`.
    """
    entry = ENGINES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        ENGINES[name] = entry
    return entry()
