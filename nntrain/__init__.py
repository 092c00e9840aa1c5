"""nntrain: a small, hackable PyTorch training library that runs on its own Learner and on Lightning.

The names below load on first use (PEP 562), so `import nntrain` costs no torch import and the
`nntrain` command answers `--help` at once. Lightning is imported only by `nntrain.adapters` (the
bridge), on first use. `nntrain.__version__` is the installed distribution's version (its one
source is `pyproject.toml`), read on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` imports these
    __version__: str
    from nntrain.checkpoint import CheckpointError, save_checkpoint
    from nntrain.checkpoint_state import latest_checkpoint, load_checkpoint
    from nntrain.data import (
        DataLoaders,
        ResumableDataLoader,
        digits_dataset_dict,
        hf_ds_collate_fn,
        load_dataset_dict,
    )
    from nntrain.events import (
        EVENTS,
        CancelBatchException,
        CancelEpochException,
        CancelFitException,
        CancelStepException,
        Subscriber,
    )
    from nntrain.learner import Learner, MomentumLearner
    from nntrain.load import load_learner
    from nntrain.schedules import OneCycle
    from nntrain.subscribers import (
        BatchTransformS,
        CheckpointS,
        DeviceS,
        EarlyStoppingS,
        GradAccumS,
        GradClipS,
        LRFindS,
        MetricsS,
        MixedPrecisionS,
        NanGuardS,
        ProgressS,
        SaveBestS,
        SchedulerS,
        TensorBoardS,
    )
    from nntrain.subscribers.lr_find import SuggestedLRs

_EXPORTS: dict[str, str] = {
    "BatchTransformS": "nntrain.subscribers",
    "EVENTS": "nntrain.events",
    "CancelBatchException": "nntrain.events",
    "CancelEpochException": "nntrain.events",
    "CancelFitException": "nntrain.events",
    "CancelStepException": "nntrain.events",
    "CheckpointError": "nntrain.checkpoint",
    "CheckpointS": "nntrain.subscribers",
    "DataLoaders": "nntrain.data",
    "DeviceS": "nntrain.subscribers",
    "EarlyStoppingS": "nntrain.subscribers",
    "GradAccumS": "nntrain.subscribers",
    "GradClipS": "nntrain.subscribers",
    "LRFindS": "nntrain.subscribers",
    "Learner": "nntrain.learner",
    "MetricsS": "nntrain.subscribers",
    "MixedPrecisionS": "nntrain.subscribers",
    "MomentumLearner": "nntrain.learner",
    "NanGuardS": "nntrain.subscribers",
    "OneCycle": "nntrain.schedules",
    "ProgressS": "nntrain.subscribers",
    "ResumableDataLoader": "nntrain.data",
    "SaveBestS": "nntrain.subscribers",
    "SchedulerS": "nntrain.subscribers",
    "Subscriber": "nntrain.events",
    "SuggestedLRs": "nntrain.subscribers.lr_find",
    "TensorBoardS": "nntrain.subscribers",
    "digits_dataset_dict": "nntrain.data",
    "hf_ds_collate_fn": "nntrain.data",
    "latest_checkpoint": "nntrain.checkpoint_state",
    "load_checkpoint": "nntrain.checkpoint_state",
    "load_dataset_dict": "nntrain.data",
    "load_learner": "nntrain.load",
    "save_checkpoint": "nntrain.checkpoint",
}
"""Each public name and the module that defines it (or, for `nntrain.subscribers`, re-exports it)."""

__all__ = [
    "BatchTransformS",
    "EVENTS",
    "CancelBatchException",
    "CancelEpochException",
    "CancelFitException",
    "CancelStepException",
    "CheckpointError",
    "CheckpointS",
    "DataLoaders",
    "DeviceS",
    "EarlyStoppingS",
    "GradAccumS",
    "GradClipS",
    "LRFindS",
    "Learner",
    "MetricsS",
    "MixedPrecisionS",
    "MomentumLearner",
    "NanGuardS",
    "OneCycle",
    "ProgressS",
    "ResumableDataLoader",
    "SaveBestS",
    "SchedulerS",
    "Subscriber",
    "SuggestedLRs",
    "TensorBoardS",
    "digits_dataset_dict",
    "hf_ds_collate_fn",
    "latest_checkpoint",
    "load_checkpoint",
    "load_dataset_dict",
    "load_learner",
    "save_checkpoint",
]


def _version() -> str:
    """The installed distribution's version; "0+unknown" when nntrain runs from a source tree
    that is not installed. (`importlib.metadata` costs ~10 ms to import: not at `import nntrain`.)"""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nntrain")
    except PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and keep the name here (PEP 562)."""
    if name == "__version__":
        value: Any = _version()
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nntrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The module's attributes and the public names not loaded yet."""
    return sorted({*globals(), *__all__, "__version__"})
