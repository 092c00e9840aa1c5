"""Logging helpers: `quiet_loggers` raises some libraries' log levels for a block, then puts them
back; `make_log_dir` makes a writable log directory or says why it cannot."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["quiet_loggers", "make_log_dir"]


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int) -> Iterator[None]:
    """Within the block, the loggers `names` drop records below `level` (a stricter level the
    user set stays); their own levels are restored afterwards. Warnings are untouched."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


def make_log_dir(path: str | os.PathLike[str]) -> Path:
    """Create the directory `path` (and its parents) if needed and return it.

    Raises:
        OSError: it cannot be created or is not writable; the message names the path.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the TensorBoard log directory '{path}': {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OSError(f"the TensorBoard log directory '{path}' is not writable")
    return path
