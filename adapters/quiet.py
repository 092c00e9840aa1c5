"""What a bridged run shows: Lightning's info lines and the third-party warnings users cannot act
on only with `verbose=True`, in this process and in the processes Lightning starts
(`ddp_spawn`); what the user asked for explicitly (a `ModelSummary`, a profiler's report)
always."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from nntrain.logs import quiet_loggers

__all__ = ["lightning_quiet", "quiet_this_process", "asked_for", "UNACTIONABLE_WARNINGS"]

_LOGGERS = ("lightning.pytorch", "lightning.fabric")

UNACTIONABLE_WARNINGS: tuple[str, ...] = (
    r".*isinstance\(treespec, LeafSpec\)",  # torch's pytree deprecation, raised inside Lightning's own code
)
"""Warnings raised inside the libraries that a user of the bridge cannot act on (regexes)."""

_LOG_INTERVAL = r"The number of training batches .* is smaller than the logging interval"
"""Lightning's `log_every_n_steps` warning: unactionable for a logger the bridge made (`TensorBoardS`)."""

SUMMARY_LOGGERS = ("lightning.pytorch.callbacks.model_summary",)
PROFILER_LOGGERS = ("lightning.pytorch.profilers",)


def asked_for(options: dict[str, Any]) -> tuple[str, ...]:
    """The loggers of what `options` ask Lightning to print: a model summary
    (`enable_model_summary=True`, a `ModelSummary` callback), a profiler's report."""
    from lightning.pytorch.callbacks import ModelSummary

    shown: list[str] = []
    callbacks = options.get("callbacks") or []
    if options.get("enable_model_summary") or any(isinstance(cb, ModelSummary) for cb in callbacks):
        shown += SUMMARY_LOGGERS
    if options.get("profiler") is not None:
        shown += PROFILER_LOGGERS
    return tuple(shown)


@contextlib.contextmanager
def lightning_quiet(verbose: bool, shown: Sequence[str] = (), bridge_logger: bool = False) -> Iterator[None]:
    """For the block, unless `verbose`: Lightning's info lines off except those of the loggers
    `shown`, and `UNACTIONABLE_WARNINGS` (with `bridge_logger`, the `log_every_n_steps` one too)
    ignored. Other warnings are never hidden."""
    if verbose:
        yield
        return
    with quiet_loggers(_LOGGERS, logging.WARNING), _shown(shown), warnings.catch_warnings():
        for pattern in (*UNACTIONABLE_WARNINGS, *((_LOG_INTERVAL,) if bridge_logger else ())):
            warnings.filterwarnings("ignore", pattern)
        yield


@contextlib.contextmanager
def _shown(names: Sequence[str]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


def quiet_this_process(shown: Sequence[str] = (), bridge_logger: bool = False) -> None:
    """`lightning_quiet` for the rest of this process: a process Lightning started (`ddp_spawn`),
    which inherits neither the caller's log levels nor its warning filters."""
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in shown:
        logging.getLogger(name).setLevel(logging.INFO)
    for pattern in (*UNACTIONABLE_WARNINGS, *((_LOG_INTERVAL,) if bridge_logger else ())):
        warnings.filterwarnings("ignore", pattern)
