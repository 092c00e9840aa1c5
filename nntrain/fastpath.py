"""The opt-in fast path: data kept on the device, and a training step compiled with `torch.compile`.

`DeviceDataLoader` holds a dataset's tensors on one device and shuffles there each epoch, so a
batch is one device-side gather and no host work. `CompiledLearner` compiles the forward pass
(the learner's `predict` and `get_loss`, so overrides apply) and the optimizer step; with
`mode="reduce-overhead"` on CUDA, torch.compile replays them as CUDA graphs, which removes the
per-kernel launch cost that dominates small models.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from nntrain.data import DataLoaders
from nntrain.learner import Learner

__all__ = ["DeviceDataLoader", "to_device_loaders", "CompiledLearner"]


class DeviceDataLoader:
    """Batches of `(x[idx], y[idx])` from tensors held on `device`, reshuffled there every epoch.

    Args:
        x: inputs, first dimension the samples.
        y: targets, same length.
        batch_size: samples per batch.
        shuffle: draw a new permutation (on the device, from `generator` or the device's default
            generator) at the start of each epoch.
        drop_last: leave out a last, smaller batch (one batch shape means one compiled graph).
        device: where the tensors live; their current device when None.
        generator: a `torch.Generator` on `device` for the permutation.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device) if device is not None else x.device
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = generator

    def __len__(self) -> int:
        n, bs = len(self.x), self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, device=self.x.device, generator=self.generator)
        else:
            order = torch.arange(n, device=self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


def to_device_loaders(
    dls: DataLoaders, device: torch.device | str, batch_size: int | None = None, drop_last: bool = True
) -> DataLoaders:
    """`dls` (whose datasets hold `x` and `y` tensors, as `DataLoaders.from_hf_dd` makes) as
    `DeviceDataLoader`s on `device`; the training one shuffles.

    Raises:
        TypeError: a dataset without `x` and `y` tensors.
    """
    loaders: list[Any] = []
    for name, dl in (("train", dls.train), ("valid", dls.valid)):
        ds: Any = getattr(dl, "dataset", None)
        if not (isinstance(getattr(ds, "x", None), torch.Tensor) and isinstance(getattr(ds, "y", None), torch.Tensor)):
            raise TypeError(
                f"dls.{name}.dataset must hold tensors x and y (a TensorPairDataset), got {type(ds).__name__}"
            )
        bs = batch_size or dl.batch_size
        # (a loader made with a batch_sampler has batch_size None, which is not handled here)
        loaders.append(
            DeviceDataLoader(
                ds.x,
                ds.y,
                bs,  # type: ignore[arg-type]
                shuffle=name == "train",
                drop_last=drop_last and name == "train",
                device=device,
            )
        )
    return DataLoaders(*loaders)


class CompiledLearner(Learner):
    """A `Learner` whose training step is compiled: forward + loss as one graph (its backward
    compiled by AOTAutograd) and the optimizer step as another.

    Combine it with another learner by inheritance, e.g.
    `class FastMomentum(CompiledLearner, MomentumLearner)`; `predict`, `get_loss`, `step` and
    `zero_grad` overrides are traced. Differences from the eager step: `after_predict`,
    `after_loss`, `before_backward`, `after_backward`, `before_step` and `after_step` fire after the
    compiled parts have run, so a
    subscriber sees the results but cannot change them (a `CancelBatchException` raised in
    `after_loss` comes after the optimizer step); validation passes and the Lightning engine run
    the eager step. The first batches of each new input shape pay the compilation.

    Args:
        *args: as for `Learner` (and the class combined with it).
        mode: torch.compile mode; "reduce-overhead" uses CUDA graphs on CUDA.
        **kwargs: as for `Learner`.
    """

    def __init__(self, *args: Any, mode: str = "reduce-overhead", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compile_mode = mode
        self._compiled_forward: Any = None
        self._compiled_step: Any = None

    def _forward(self, batch: Any) -> tuple[Any, torch.Tensor]:
        self.batch = batch
        self.predict()
        self.get_loss()
        return self.preds, self.loss

    def _opt_step(self) -> None:
        self.step()

    def run_step(self) -> None:
        """The compiled training step; the eager one for validation and under Lightning."""
        if not self.model.training or not self.engine.runs_compiled_steps:
            super().run_step()
            return
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self._forward, mode=self.compile_mode)
            self._compiled_step = torch.compile(self._opt_step, mode=self.compile_mode)
        publish = self.dispatch.publish
        self.preds, self.loss = self._compiled_forward(self.batch)
        publish("after_predict")
        publish("after_loss")
        self.optimize(self._compiled_step)
