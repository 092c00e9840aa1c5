"""nntrain: a small, hackable PyTorch training library that runs on its own Learner and on Lightning.

Lightning is imported only by `nntrain.adapters` (the bridge), on first use.
"""

from nntrain.data import DataLoaders, ResumableDataLoader, digits_dataset_dict, hf_ds_collate_fn, load_dataset_dict
from nntrain.learner import (
    EVENTS,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    Learner,
    MomentumLearner,
    Subscriber,
)
from nntrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from nntrain.schedules import OneCycle
from nntrain.subscribers import (
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

__all__ = [
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
    "TensorBoardS",
    "digits_dataset_dict",
    "hf_ds_collate_fn",
    "latest_checkpoint",
    "load_checkpoint",
    "load_dataset_dict",
    "save_checkpoint",
]
__version__ = "0.1.0"
