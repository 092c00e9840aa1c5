"""nntrain: a small, hackable PyTorch training library that runs on its own Learner and on Lightning.

Lightning is imported only by `nntrain.adapters` (the bridge), on first use.
"""

from nntrain.data import DataLoaders, ResumableDataLoader, digits_dataset_dict, hf_ds_collate_fn, load_dataset_dict
from nntrain.learner import (
    EVENTS,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    Learner,
    MomentumLearner,
    Subscriber,
)
from nntrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from nntrain.subscribers import CheckpointS, DeviceS, LRFindS, MetricsS, NanGuardS, ProgressS, TensorBoardS

__all__ = [
    "EVENTS",
    "CancelBatchException",
    "CancelEpochException",
    "CancelFitException",
    "CheckpointError",
    "CheckpointS",
    "DataLoaders",
    "DeviceS",
    "LRFindS",
    "Learner",
    "MetricsS",
    "MomentumLearner",
    "NanGuardS",
    "ProgressS",
    "ResumableDataLoader",
    "Subscriber",
    "TensorBoardS",
    "digits_dataset_dict",
    "hf_ds_collate_fn",
    "latest_checkpoint",
    "load_checkpoint",
    "load_dataset_dict",
    "save_checkpoint",
]
__version__ = "0.1.0"
