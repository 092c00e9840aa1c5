"""The subscribers users expect: metrics, device placement, LR finder, progress, TensorBoard,
checkpoints and the NaN guard."""

from nntrain.subscribers.checkpoint import CheckpointS, NonFiniteWeightsError
from nntrain.subscribers.device import DeviceS
from nntrain.subscribers.guard import NanGuardS, NonFiniteLossError
from nntrain.subscribers.lr_find import LRFindS
from nntrain.subscribers.metrics import MetricsS
from nntrain.subscribers.progress import ProgressS
from nntrain.subscribers.tensorboard import TensorBoardS

__all__ = [
    "CheckpointS",
    "DeviceS",
    "LRFindS",
    "MetricsS",
    "NanGuardS",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "ProgressS",
    "TensorBoardS",
]
