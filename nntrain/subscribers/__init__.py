"""The subscribers users expect: metrics, device placement, LR finder, progress, TensorBoard."""

from nntrain.subscribers.device import DeviceS
from nntrain.subscribers.lr_find import LRFindS
from nntrain.subscribers.metrics import MetricsS
from nntrain.subscribers.progress import ProgressS
from nntrain.subscribers.tensorboard import TensorBoardS

__all__ = ["DeviceS", "LRFindS", "MetricsS", "ProgressS", "TensorBoardS"]
