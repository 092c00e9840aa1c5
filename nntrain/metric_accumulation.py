"""Metric accumulation over an epoch: `MetricAccumulator`, the algorithm `MetricsS` runs.

The per-batch path only appends detached tensors and a Python int to buffers: no host copy, no
`.item()`, no device synchronisation. Every `flush_every` batches (and at the end of the epoch)
the buffers are folded into device-side running values; the values become Python floats once
per epoch. Under `torch.distributed` the epoch values cover all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["MetricAccumulator", "real_samples", "is_rank_zero"]


def real_samples(dl: Any) -> int | None:
    """How many of this process's samples in a pass over `dl` are real, when `dl` samples with a
    padding `DistributedSampler` (it repeats the first indices so every rank gets as many); None
    when nothing is padded.

    The sampler gives rank r the positions r, r + W, r + 2W, ... of the padded index list; the
    positions at or past the dataset's length are the repeats, so they come last on each rank.
    """
    sampler = getattr(dl, "sampler", None)
    if not isinstance(sampler, torch.utils.data.DistributedSampler) or sampler.drop_last:
        return None
    n = len(sampler.dataset)  # type: ignore[arg-type]  # DistributedSampler needs a sized one
    if sampler.total_size == n:
        return None
    return len(range(sampler.rank, n, sampler.num_replicas))


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _accum_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else sums over an epoch are kept in float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _add_weighted(total: Tensor | None, values: list[Tensor], sizes: list[int]) -> Tensor:
    """`total + sum(v * n)` for per-batch means `values` and batch sizes `sizes`, in place when it can.

    Batches are grouped by size so that every weight is a Python scalar: a tensor of weights
    would need a host-to-device copy, which synchronises on CUDA. Sums are kept in float64
    (float32 on MPS).
    """
    first = sizes[0]
    if all(size == first for size in sizes):  # the usual case: one group, three kernels
        groups = {first: values}
    else:
        groups = {}
        for value, size in zip(values, sizes):
            groups.setdefault(size, []).append(value)
    for size, group in groups.items():
        part = torch.stack(group).sum(0, dtype=_accum_dtype(group[0].device))
        if total is None:
            total = part.mul_(size)
        else:
            total.add_(part, alpha=size)
    assert total is not None
    return total


def _to_python(values: list[Tensor]) -> list[float | list[float]]:
    """`values` as Python floats (or lists of floats), one host copy per device, not per value."""
    out: list[Any] = [None] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        by_device.setdefault(value.device, []).append(i)
    for device, indices in by_device.items():
        dtype = _accum_dtype(device)
        flat = torch.cat([values[i].detach().reshape(-1).to(dtype) for i in indices]).tolist()
        start = 0
        for i in indices:
            n = values[i].numel()
            out[i] = flat[start] if n == 1 else flat[start : start + n]
            start += n
    return out


def _collective_device(default: torch.device) -> torch.device:
    backend = dist.get_backend()
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return default


def _is_metric_object(metric: Any) -> bool:
    return all(callable(getattr(metric, name, None)) for name in ("update", "compute", "reset"))


def _compute_global(metric: Any) -> Any:
    """`metric.compute()` over all ranks: torcheval needs an explicit sync, torchmetrics syncs itself."""
    if _world_size() > 1:
        from torcheval.metrics import Metric as TorchevalMetric
        from torcheval.metrics.toolkit import sync_and_compute

        if isinstance(metric, TorchevalMetric):
            return sync_and_compute(metric)
    return metric.compute()


def _clone(value: Any) -> Any:
    """`value` with every tensor in it (in dicts and lists) cloned: metric states are updated in place."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _metric_state(metric: Any) -> dict[str, Any]:
    """A metric object's accumulated state: torchmetrics' `metric_state`, else `state_dict()`."""
    if hasattr(metric, "metric_state"):  # torchmetrics: its state_dict() leaves states out by default
        return {"torchmetrics": _clone(dict(metric.metric_state)), "update_count": getattr(metric, "_update_count", 0)}
    if hasattr(metric, "state_dict"):  # torcheval
        return {"state_dict": _clone(metric.state_dict())}
    return {}


def _load_metric_state(metric: Any, state: dict[str, Any]) -> None:
    """Restore what `_metric_state` returned."""
    if "torchmetrics" in state:
        for name, value in _clone(state["torchmetrics"]).items():
            setattr(metric, name, value)
        metric._update_count = state["update_count"]
        metric._computed = None
    elif "state_dict" in state:
        metric.load_state_dict(state["state_dict"])


class MetricAccumulator:
    """The batch-size-weighted mean loss and `metrics` over an epoch, kept off the per-batch path.

    `add` buffers a batch; every `flush_every` batches the buffer is folded in: metric objects get
    one `update` on the concatenated predictions and targets (also flushed earlier when the
    buffered predictions reach `max_buffered` elements, which bounds the memory held), functions
    are evaluated per buffered batch and summed weighted by batch size, all on the device.
    `compute` turns the values into floats (one host copy, plus collectives under
    `torch.distributed`).

    The buffer holds references, not copies: a loader that refills the same target tensor in
    place would need a smaller `flush_every` (1) to be read before it is overwritten.

    Args:
        metrics: name -> a metric object with `update(preds, targets)`, `compute()` and `reset()`
            (torcheval, torchmetrics; moved to the predictions' device on first use), or a
            function `f(preds, targets) -> Tensor` giving a per-batch mean. Under
            `torch.distributed`, torcheval and torchmetrics objects and functions are reduced over
            all ranks; other metric objects are computed per rank.
        flush_every: batches buffered before they are folded in. Each fold has a fixed cost
            (concatenation, each metric's input checks), so fewer folds cost less per batch.
        max_buffered: fold in as soon as the buffered predictions hold this many elements
            (4M float32 elements: 16 MB).

    Raises:
        TypeError: a metric is neither a metric object nor callable.
        ValueError: `flush_every` is not a positive int.
    """

    def __init__(self, metrics: Mapping[str, Any], flush_every: int = 256, max_buffered: int = 1 << 22) -> None:
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be a positive int, got {flush_every!r}")
        if not isinstance(max_buffered, int) or max_buffered < 1:
            raise ValueError(f"max_buffered must be a positive int, got {max_buffered!r}")
        if "loss" in metrics or "epoch" in metrics or "mode" in metrics:
            raise ValueError("metric names 'loss', 'epoch' and 'mode' are taken by the report row")
        self.metrics = dict(metrics)
        self.objects: dict[str, Any] = {}
        self.functions: dict[str, Callable[[Tensor, Tensor], Any]] = {}
        for name, metric in self.metrics.items():
            if isinstance(metric, type):
                raise TypeError(
                    f"metric {name!r} is the class {metric.__name__}, not a metric: pass an instance, "
                    f"{name}={metric.__name__}(...)"
                )
            if _is_metric_object(metric):
                self.objects[name] = metric
            elif callable(metric):
                self.functions[name] = metric
            else:
                raise TypeError(
                    f"metric {name!r} must have update/compute/reset (torcheval, torchmetrics) or be "
                    f"a function f(preds, targets) -> Tensor, got {type(metric).__name__}"
                )
        self.flush_every = flush_every
        self.max_buffered = max_buffered
        self._keep_preds = bool(self.metrics)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (call at the start of each epoch)."""
        for metric in self.objects.values():
            metric.reset()
        self.clear_buffer()
        self.count = 0
        self._loss_sum: Tensor | None = None
        self._fn_sums: dict[str, Tensor] = {}

    def clear_buffer(self) -> None:
        """Drop the buffered batches without folding them in."""
        self._preds: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._losses: list[Tensor] = []
        self._sizes: list[int] = []
        self._buffered = 0  # elements of the buffered predictions

    def add(self, preds: Tensor, targets: Tensor, loss: Tensor) -> None:
        """Buffer one batch; `loss` is its mean. No host copy or sync (except every `flush_every`)."""
        if self._keep_preds:
            self._preds.append(preds.detach() if preds.requires_grad else preds)
            self._targets.append(targets)
            self._buffered += preds.numel()
        self._losses.append(loss.detach() if loss.requires_grad else loss)
        sizes = self._sizes
        sizes.append(targets.shape[0])
        if len(sizes) >= self.flush_every or self._buffered >= self.max_buffered:
            self.flush()

    def flush(self) -> None:
        """Fold the buffered batches into the running values, on the device."""
        if not self._sizes:
            return
        sizes = self._sizes
        with torch.no_grad():
            self._loss_sum = _add_weighted(self._loss_sum, self._losses, sizes)
            for name, fn in self.functions.items():
                values = [torch.as_tensor(fn(p, t)) for p, t in zip(self._preds, self._targets)]
                self._fn_sums[name] = _add_weighted(self._fn_sums.get(name), values, sizes)
            if self.objects:
                preds = torch.cat(self._preds) if len(self._preds) > 1 else self._preds[0]
                targets = torch.cat(self._targets) if len(self._targets) > 1 else self._targets[0]
                for metric in self.objects.values():
                    if getattr(metric, "device", preds.device) != preds.device and hasattr(metric, "to"):
                        metric.to(preds.device)
                    metric.update(preds, targets)
        self.count += sum(sizes)
        self.clear_buffer()

    def state_dict(self) -> dict[str, Any]:
        """The epoch so far: running sums, sample count, each metric object's state and the
        buffered batches. The buffer is saved as it is, not flushed, so taking a checkpoint never
        changes where the flushes fall (and a resumed epoch gives bitwise the same values)."""
        return {  # copies of the running tensors: a later flush adds to them in place
            "count": self.count,
            "loss_sum": None if self._loss_sum is None else self._loss_sum.clone(),
            "fn_sums": {name: value.clone() for name, value in self._fn_sums.items()},
            "objects": {name: _metric_state(m) for name, m in self.objects.items()},
            "buffer": {
                "preds": list(self._preds),
                "targets": list(self._targets),
                "losses": list(self._losses),
                "sizes": list(self._sizes),
                "buffered": self._buffered,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` (metric objects and names must match)."""
        self.count = state["count"]
        self._loss_sum = None if state["loss_sum"] is None else state["loss_sum"].clone()
        self._fn_sums = {name: value.clone() for name, value in state["fn_sums"].items()}
        for name, metric in self.objects.items():
            _load_metric_state(metric, state["objects"][name])
        buf = state["buffer"]
        self._preds, self._targets, self._losses = list(buf["preds"]), list(buf["targets"]), list(buf["losses"])
        self._sizes, self._buffered = list(buf["sizes"]), buf["buffered"]

    def compute(self) -> dict[str, float | list[float]]:
        """Flush and return `{'loss': ..., name: ...}` over this epoch, over all ranks if distributed.

        Every rank gets the same values. With no samples seen (on any rank), every value is NaN.
        """
        self.flush()
        found = [self._loss_sum] + [self._fn_sums.get(name) for name in self.functions]
        device = self._loss_sum.device if self._loss_sum is not None else torch.device("cpu")
        sums = [torch.zeros((), device=device) if s is None else s for s in found]
        if _world_size() > 1:
            # One collective for the loss, the function sums and the sample count.
            device = _collective_device(device)
            local = torch.stack(
                [s.to(device, _accum_dtype(device)) for s in sums]
                + [torch.tensor(self.count, dtype=_accum_dtype(device), device=device)]
            )
            dist.all_reduce(local)
            *sum_values, count = local.tolist()
            objects = {}
            if count > 0:
                objects = {name: _compute_global(m) for name, m in self.objects.items()}
            object_values = _to_python([torch.as_tensor(v) for v in objects.values()])
        else:
            count = self.count
            objects = {name: m.compute() for name, m in self.objects.items()} if count > 0 else {}
            # One host copy for everything when all values share a device.
            values = _to_python(sums + [torch.as_tensor(v) for v in objects.values()])
            sum_values, object_values = values[: len(sums)], values[len(sums) :]
        nan = float("nan")
        means = [s / count if count > 0 else nan for s in sum_values]
        out: dict[str, Any] = {"loss": means[0]}
        fn_means = dict(zip(self.functions, means[1:]))
        obj_values = dict(zip(objects, object_values))
        for name in self.metrics:  # the user's order
            out[name] = fn_means[name] if name in fn_means else obj_values.get(name, nan)
        return out
