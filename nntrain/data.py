"""Data: where datasets come from (the embedded digits set, the hub) and the public data API.

The loaders live in their own modules, re-exported here so `from nntrain.data import ...` keeps
working: `DataLoaders` (`nntrain.dataloaders`), the batch-serving datasets and loaders
(`nntrain.loaders`), image decoding (`nntrain.images`), the uint8 image cache
(`nntrain.image_cache`), token columns (`nntrain.tokens`) and streaming splits
(`nntrain.streaming`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nntrain.dataloaders import DataLoaders
from nntrain.hf_columns import import_datasets as _import_datasets
from nntrain.image_cache import DiskArray, ImageArrayDataset
from nntrain.images import hf_ds_collate_fn
from nntrain.loaders import (
    BatchLoader,
    ResumableDataLoader,
    TensorDictDataset,
    TensorPairDataset,
    UInt8ToFloat,
    pre_batched_collate,
)
from nntrain.logs import quiet_loggers
from nntrain.streaming import StreamBatches
from nntrain.tokens import PaddedTokenDataset

if TYPE_CHECKING:  # datasets is imported where it is used: `import nntrain` stays fast
    import datasets

__all__ = [
    "DataLoaders",
    "ResumableDataLoader",
    "BatchLoader",
    "UInt8ToFloat",
    "TensorPairDataset",
    "TensorDictDataset",
    "PaddedTokenDataset",
    "ImageArrayDataset",
    "DiskArray",
    "StreamBatches",
    "pre_batched_collate",
    "hf_ds_collate_fn",
    "digits_dataset_dict",
    "load_dataset_dict",
]


def digits_dataset_dict(valid_fraction: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """scikit-learn's 1797 8x8 handwritten digits as a `DatasetDict` of grayscale PIL images.

    Each class is split on its own (a permutation drawn from `seed`), so both splits hold
    every digit in about the same proportion.

    Args:
        valid_fraction: share of each class that goes to the "validation" split.
        seed: seed of the split's permutation.

    Returns:
        Splits "train" and "validation" with features image (`datasets.Image`, mode "L",
        values 0..255) and label (`ClassLabel` "0".."9").
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be between 0 and 1 (exclusive), got {valid_fraction!r}")
    hf = _import_datasets()
    from PIL import Image
    from sklearn.datasets import load_digits  # 1 s import, needed only here

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    valid_idx = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        valid_idx.append(members[: round(valid_fraction * len(members))])
    is_valid = np.zeros(len(labels), dtype=bool)
    is_valid[np.concatenate(valid_idx)] = True
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=[str(i) for i in range(10)])})

    def split(mask: np.ndarray) -> datasets.Dataset:
        images = [Image.fromarray(p) for p in pixels[mask]]  # 2-D uint8 arrays make "L" images
        return hf.Dataset.from_dict({"image": images, "label": labels[mask].tolist()}, features=features)

    return hf.DatasetDict({"train": split(~is_valid), "validation": split(is_valid)})


def _hub_unreachable(timeout: float = 1.5) -> str | None:
    """Why the hub cannot be reached now, or None when it can: a TCP connection to its endpoint
    (`HF_ENDPOINT`), or to the HTTPS proxy in the way, does not open within `timeout` seconds.

    The connection is tried in a daemon thread, because a name lookup does not honour socket
    timeouts (an unreachable DNS server can hold it for tens of seconds).
    """
    import os
    import socket
    import threading
    import urllib.parse
    import urllib.request

    hub = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxies = urllib.request.getproxies()
    proxy = proxies.get(hub.scheme) or proxies.get("all")
    via = hub
    if proxy and not urllib.request.proxy_bypass(hub.hostname or ""):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (via.hostname or "", via.port or (443 if via.scheme == "https" else 80))
    outcome: list[OSError | None] = []  # the thread's answer: None connected, else the error

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    probe = threading.Thread(target=connect, name="nntrain-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    if outcome == [None]:
        return None
    why = f"no answer within {timeout:g} s" if not outcome or isinstance(outcome[0], TimeoutError) else outcome[0]
    return (
        f"cannot connect to {'the hub' if via is hub else 'the proxy'} {address[0]}:{address[1]} "
        f"({why}; HF_HUB_OFFLINE=1 loads a cached copy)"
    )


def load_dataset_dict(name: str) -> datasets.DatasetDict:
    """The `DatasetDict` called `name`: "digits" is the embedded set, any other name comes from the hub.

    Unless `HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` is set (the hub's cache is used) or `name` is a
    local path, the hub is probed first, so an offline machine fails in about a second instead of
    after the hub client's retries.

    Raises:
        RuntimeError: the hub could not be reached or has no such dataset.
    """
    if name == "digits":
        return digits_dataset_dict()
    import logging
    import os

    def failed(reason: str) -> RuntimeError:
        return RuntimeError(
            f"could not load dataset {name!r} from the hub: {reason}; use --dataset digits for the embedded data"
        )

    offline = any(
        os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    reason = None if offline or os.path.exists(name) else _hub_unreachable()
    if reason is not None:
        raise failed(reason)
    datasets = _import_datasets()

    # For this call only: the hub client's retry and fallback warnings would bury the one-line error.
    try:
        with quiet_loggers(("datasets", "huggingface_hub"), logging.ERROR):
            return datasets.load_dataset(name)
    except OSError as exc:  # ConnectionError, DatasetNotFoundError (a FileNotFoundError), timeouts
        raise failed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
