"""Batch transforms: augmentation and normalisation of a whole batch of images (N, C, H, W),
written with torch ops so they run where the batch is (the GPU, after `DeviceS` or Lightning
moved it), one kernel or a few per batch, no loop over samples.

Each random transform draws a value per sample from `generator` (a `torch.Generator` on the
batch's device), or from torch's default generator when none is given. `BatchTransformS`
passes its own generator, which makes the draws the same on both engines, part of
checkpoints, and different on each DDP rank. Any callable `x -> x` also works as a step of
`Compose` (or as `BatchTransformS`'s `fn`): torchvision's v2 transforms, for one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "random_flip",
    "random_crop",
    "normalize",
    "cutout",
    "RandomFlip",
    "RandomCrop",
    "RandomTranslate",
    "Normalize",
    "Cutout",
    "Flatten",
    "Compose",
    "takes_generator",
]


def _per_sample(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`mask` (N,) shaped to broadcast over a batch like `x`."""
    return mask.view(-1, *([1] * (x.ndim - 1)))


def random_flip(
    x: torch.Tensor, p: float = 0.5, dim: int = -1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Flip each sample of `x` along `dim` (-1: left-right) with probability `p`."""
    flip = torch.rand(len(x), device=x.device, generator=generator) < p
    return torch.where(_per_sample(x, flip), x.flip(dim), x)


def random_crop(
    x: torch.Tensor,
    size: int | Sequence[int] | None = None,
    padding: int = 0,
    fill: float = 0.0,
    mode: str = "constant",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random `size` crop of each sample of `x` (N, C, H, W) after padding it by `padding` on
    every side (`mode` "constant" with `fill`, or "reflect"/"replicate"); with `size` None the
    crop keeps the size: each sample is translated by up to `padding` pixels."""
    h, w = x.shape[-2:]
    ch, cw = (h, w) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    if padding:
        pads = (padding,) * 4
        x = F.pad(x, pads, mode=mode, value=fill) if mode == "constant" else F.pad(x, pads, mode=mode)
    ph, pw = x.shape[-2:]
    if ch > ph or cw > pw:
        raise ValueError(f"crop size {(ch, cw)} is larger than the padded image {(ph, pw)}")
    n = len(x)
    top = torch.randint(0, ph - ch + 1, (n,), device=x.device, generator=generator)
    left = torch.randint(0, pw - cw + 1, (n,), device=x.device, generator=generator)
    rows = (top[:, None] + torch.arange(ch, device=x.device))[:, None, :, None]  # (N, 1, ch, 1)
    cols = (left[:, None] + torch.arange(cw, device=x.device))[:, None, None, :]  # (N, 1, 1, cw)
    rows = rows.expand(n, x.shape[1], ch, pw)
    return x.gather(2, rows).gather(3, cols.expand(n, x.shape[1], ch, cw))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`(x - mean) / std` per channel (`mean`, `std` of shape (C,), on `x`'s device)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.view(shape)) / std.view(shape)


def cutout(
    x: torch.Tensor, size: int, p: float = 1.0, fill: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill a `size` x `size` square at a random centre of each sample with `fill` (with
    probability `p`); the square may hang over the border."""
    n, h, w = len(x), x.shape[-2], x.shape[-1]
    cy = torch.randint(0, h, (n,), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n,), device=x.device, generator=generator)
    apply = torch.rand(n, device=x.device, generator=generator) < p
    top, left = cy - size // 2, cx - size // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inside_y = (ys >= top[:, None]) & (ys < top[:, None] + size)  # (N, H)
    inside_x = (xs >= left[:, None]) & (xs < left[:, None] + size)  # (N, W)
    hole = (inside_y[:, :, None] & inside_x[:, None, :] & apply[:, None, None])[:, None]  # (N, 1, H, W)
    return x.masked_fill(hole, fill)


def takes_generator(fn: Any) -> bool:
    """Whether `fn` draws from a `generator=` argument (the transforms of this module do)."""
    return bool(getattr(fn, "takes_generator", False))


def _draws(fn: Any) -> bool:
    """Whether `fn` may draw random numbers from torch's default generators: all but the
    deterministic transforms of this module."""
    return not isinstance(fn, (Normalize, Flatten))


class RandomFlip:
    """`random_flip` as a transform: flip each sample left-right with probability `p`."""

    takes_generator = True

    def __init__(self, p: float = 0.5, dim: int = -1) -> None:
        self.p, self.dim = p, dim

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_flip(x, self.p, self.dim, generator)

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p}, dim={self.dim})"


class RandomCrop:
    """`random_crop` as a transform: pad by `padding`, then crop `size` at a random place."""

    takes_generator = True

    def __init__(
        self, size: int | Sequence[int] | None = None, padding: int = 0, fill: float = 0.0, mode: str = "constant"
    ) -> None:
        self.size, self.padding, self.fill, self.mode = size, padding, fill, mode

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_crop(x, self.size, self.padding, self.fill, self.mode, generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, padding={self.padding}, mode={self.mode!r})"


class RandomTranslate(RandomCrop):
    """Translate each sample by up to `max_shift` pixels each way, filling with `fill` (or
    reflecting, `mode="reflect"`): airbench's CIFAR-10 translation."""

    def __init__(self, max_shift: int, fill: float = 0.0, mode: str = "constant") -> None:
        super().__init__(None, max_shift, fill, mode)


class Normalize:
    """Subtract `mean` and divide by `std`, per channel (kept on each device the batches use)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self._on: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._on:  # once per device: no copy per batch
            self._on[key] = (self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype))
        return normalize(x, *self._on[key])

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class Cutout:
    """`cutout` as a transform: a `size` x `size` square of `fill` at a random place."""

    takes_generator = True

    def __init__(self, size: int, p: float = 1.0, fill: float = 0.0) -> None:
        self.size, self.p, self.fill = size, p, fill

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return cutout(x, self.size, self.p, self.fill, generator)

    def __repr__(self) -> str:
        return f"Cutout(size={self.size}, p={self.p})"


class Flatten:
    """(N, C, H, W) to (N, C*H*W): the last step before an MLP (load with `flatten=False` for
    the spatial transforms before it)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1)

    def __repr__(self) -> str:
        return "Flatten()"


class Compose:
    """Apply `fns` in order; those that take a generator get the one given (the others draw
    from torch's default generators)."""

    def __init__(self, fns: Sequence[Callable[..., torch.Tensor]]) -> None:
        self.fns = list(fns)

    @property
    def takes_generator(self) -> bool:
        """Whether every step draws from the generator given (none from the default ones)."""
        return all(takes_generator(fn) or not _draws(fn) for fn in self.fns)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for fn in self.fns:
            x = fn(x, generator=generator) if takes_generator(fn) else fn(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.fns!r})"
