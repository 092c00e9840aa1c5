"""nntrain: a small, hackable PyTorch training library that runs on its own Learner and on Lightning.

Lightning is imported only by `nntrain.adapters` (the bridge), on first use.
"""

from nntrain.data import DataLoaders, digits_dataset_dict, hf_ds_collate_fn, load_dataset_dict
from nntrain.learner import (
    EVENTS,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    Learner,
    MomentumLearner,
    Subscriber,
)
from nntrain.subscribers import DeviceS, LRFindS, MetricsS, ProgressS, TensorBoardS

__all__ = [
    "EVENTS",
    "CancelBatchException",
    "CancelEpochException",
    "CancelFitException",
    "DataLoaders",
    "DeviceS",
    "LRFindS",
    "Learner",
    "MetricsS",
    "MomentumLearner",
    "ProgressS",
    "Subscriber",
    "TensorBoardS",
    "digits_dataset_dict",
    "hf_ds_collate_fn",
    "load_dataset_dict",
]
__version__ = "0.1.0"
