"""The subscribers users expect: metrics, device placement, LR finder, progress, TensorBoard,
checkpoints, the NaN guard, and the training recipes (schedules, mixed precision, clipping,
accumulation, early stopping, best-model keeping)."""

from nntrain.subscribers.checkpoint import CheckpointS, NonFiniteWeightsError
from nntrain.subscribers.device import DeviceS
from nntrain.subscribers.gradients import GradAccumS, GradClipS
from nntrain.subscribers.guard import NanGuardS, NonFiniteLossError
from nntrain.subscribers.lr_find import LRFindS
from nntrain.subscribers.metrics import MetricsS
from nntrain.subscribers.precision import MixedPrecisionS
from nntrain.subscribers.progress import ProgressS
from nntrain.subscribers.schedule import SchedulerS
from nntrain.subscribers.stopping import EarlyStoppingS, SaveBestS
from nntrain.subscribers.tensorboard import TensorBoardS
from nntrain.subscribers.transforms import BatchTransformS

__all__ = [
    "BatchTransformS",
    "CheckpointS",
    "DeviceS",
    "EarlyStoppingS",
    "GradAccumS",
    "GradClipS",
    "LRFindS",
    "MetricsS",
    "MixedPrecisionS",
    "NanGuardS",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "ProgressS",
    "SaveBestS",
    "SchedulerS",
    "TensorBoardS",
]
