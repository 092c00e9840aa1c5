"""`quiet_loggers`: raise some libraries' log levels for a block, then put them back."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

__all__ = ["quiet_loggers"]


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
