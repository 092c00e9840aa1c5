"""The engine protocol (`Engine`: what the loop and subscribers get from the engine running a
fit) and the native loop's engine (`NativeEngine`); the Lightning one is `nntrain.adapters.LightningEngine`."""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["Engine", "NativeEngine"]


class Engine(Protocol):
    """What the loop and subscribers get from the engine running a fit (`learn.engine`).

    The native loop is `NativeEngine`; the Lightning bridge has `LightningEngine`. Subscribers
    ask the engine, never its name: `rank`, `backward`, `step`, `log_metrics` (a row's values
    by name, e.g. `valid/loss`) and `logged` (the latest of them), `agree_cancel` (the ranks'
    common cancel), `save_checkpoint`, `tensorboard_logger`, and what the engine does itself
    (`precision`: a reduced precision it runs, e.g. "16-mixed", or None; `saves_on_interrupt`,
    `resumes_after_last_batch`, `runs_compiled_steps`).
    """

    name: str
    rank: int
    precision: str | None
    logged: dict[str, float]
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
        """Record an epoch's values by name (`train/loss`, `valid/accuracy`)."""

    def save_checkpoint(self, stem: Any, learner_state: dict[str, Any], learn: Any) -> Any:
        """Write a checkpoint at `stem` plus the engine's suffix; return its path."""

    def tensorboard_logger(self) -> Any:
        """A logger a TensorBoard subscriber should write through, or None."""


class NativeEngine:
    """The learner's own loop: plain autograd, cancels unwind the Python stack."""

    name = "native"
    precision = None
    saves_on_interrupt = True
    resumes_after_last_batch = True
    runs_compiled_steps = True

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}  # the last values logged by name (`learn.evaluate` returns them)

    @property
    def rank(self) -> int:
        """This process's rank in `torch.distributed` (0 when it is not initialised)."""
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

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
        """Keep the values in `logged`."""
        self.logged.update(values)

    def save_checkpoint(self, stem: Any, learner_state: dict[str, Any], learn: Any) -> Any:
        """A native checkpoint `<stem>.pt`: model and optimizer state plus `learner_state`."""
        from nntrain.checkpoint import native_checkpoint, save_checkpoint

        return save_checkpoint(native_checkpoint(learn, learner_state), f"{stem}.pt")

    def tensorboard_logger(self) -> Any:
        """None: a TensorBoard subscriber opens its own writer."""
        return None
