"""Engines and tools the `Learner` reaches by name, so the loop imports neither the bridge nor
any subscriber.

An entry is `"module:attribute"`, imported on first use; `register_engine` and `register_tool`
add or replace one. `learn.fit(engine="lightning")` runs `ENGINES["lightning"]`;
`learn.lr_find()` runs `TOOLS["lr_find"]`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["ENGINES", "TOOLS", "register_engine", "register_tool", "resolve"]

ENGINES: dict[str, str | Callable[..., Any]] = {
    "lightning": "nntrain.adapters:fit_lightning",
}
"""Engine name -> `fit(learn, epochs, train=, valid=, subs=, lr=, resume=, **options)`; "native" is the loop itself."""

TOOLS: dict[str, str | Callable[..., Any]] = {
    "lr_find": "nntrain.subscribers.lr_find:lr_find",
    "fit_one_cycle": "nntrain.subscribers.schedule:fit_one_cycle",
    "evaluate:lightning": "nntrain.adapters:evaluate_lightning",
    "get_preds:lightning": "nntrain.adapters:predict_lightning",
}
"""Tool name -> callable taking the learner first."""


def register_engine(name: str, fit: str | Callable[..., Any]) -> None:
    """Make `learn.fit(engine=name)` call `fit` (a callable or `"module:attribute"`)."""
    ENGINES[name] = fit


def register_tool(name: str, tool: str | Callable[..., Any]) -> None:
    """Make the tool `name` call `tool` (a callable or `"module:attribute"`)."""
    TOOLS[name] = tool


def resolve(table: dict[str, str | Callable[..., Any]], name: str, kind: str) -> Callable[..., Any]:
    """The callable registered as `name` in `table`, imported on first use.

    Raises:
        ValueError: nothing is registered under `name`.
    """
    entry = table.get(name)
    if entry is None:
        known = ", ".join(sorted(["native", *table] if kind == "engine" else table))
        raise ValueError(f"unknown {kind} {name!r}; known: {known}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        table[name] = entry
    return entry
