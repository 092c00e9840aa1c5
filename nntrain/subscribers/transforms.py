"""`BatchTransformS`: transform the inputs of each training batch (validation optional) where
the batch is, with random numbers of its own (miniai's `BatchTransformCB`, fastai's batch_tfms)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nntrain.events import Subscriber
from nntrain.transforms import Compose, takes_generator

__all__ = ["BatchTransformS"]


def _mixed_seed(base: int, rank: int) -> int:
    """A seed for `rank` from `base`, well mixed (nearby inputs give unrelated streams)."""
    return int(np.random.SeedSequence([base % 2**64, rank]).generate_state(1, np.uint64)[0])


class BatchTransformS(Subscriber):
    """Replace the inputs of each training batch (and validation batch with `valid=True`) by
    `fn(inputs)`, after `DeviceS` put the batch on its device (under Lightning the batch is
    there already), so the transform runs on the GPU when there is one.

    The random numbers are its own: a generator per device, seeded from `seed` (default
    `torch.initial_seed()`, which `torch.manual_seed` sets) mixed with the DDP rank. So both
    engines give the same numbers (`assert_engines_agree`), the generators' states are saved
    in checkpoints and restored on resume (a mid-epoch resume stays bitwise), and under DDP each
    rank draws its own: with one seed everywhere, rank r's flips and crops differ from rank 0's.
    Transforms of `nntrain.transforms` get the generator as `generator=`; any other callable
    (torchvision's v2 transforms, a lambda) runs with torch's default CPU generator, and the
    batch device's, set to this subscriber's streams for the call and restored after it.

    Args:
        fn: the transform, `inputs -> inputs`, or a list of them (applied in order).
        train: transform training batches.
        valid: transform validation (and evaluation) batches.
        key: for mapping batches, the entry to transform (tuple and list batches: the first item).
        seed: the seed of its generators; None: `torch.initial_seed()` at the first fit.
    """

    order = -5  # after DeviceS (-10): the batch is on its device; before subscribers that read it
    one_rank_cancels = False  # never cancels

    def __init__(
        self,
        fn: Callable[..., Any] | Sequence[Callable[..., Any]],
        train: bool = True,
        valid: bool = False,
        key: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.fn: Callable[..., Any] = Compose(fn) if isinstance(fn, (list, tuple)) else fn  # type: ignore[assignment]
        if not callable(self.fn):
            raise TypeError(f"fn must be callable (or a list of callables), got {type(fn).__name__}")
        self.train, self.valid, self.key, self.seed = train, valid, key, seed
        self._direct = takes_generator(self.fn)
        self._base: int | None = None  # the seed in use (given, or drawn at the first fit)
        self._rank = 0
        self._gens: dict[str, torch.Generator] = {}  # by device ("cpu", "cuda:0")
        self._pending: dict[str, torch.Tensor] = {}  # loaded states of generators not made yet

    def __repr__(self) -> str:
        return f"BatchTransformS({self.fn!r}, train={self.train}, valid={self.valid})"

    def before_fit(self, learn: Any) -> None:
        """Fix the seed (at the first fit; later fits continue the streams) and the rank."""
        if self._base is None:
            self._base = self.seed if self.seed is not None else torch.initial_seed()
        self._rank = learn.engine.rank

    def generator(self, device: torch.device) -> torch.Generator:
        """Its generator on `device`: made at first use, from a loaded state or the seed."""
        name = str(device)
        gen = self._gens.get(name)
        if gen is None:
            gen = self._gens[name] = torch.Generator(device)
            if name in self._pending:
                gen.set_state(self._pending.pop(name))
            else:
                gen.manual_seed(_mixed_seed(self._base if self._base is not None else torch.initial_seed(), self._rank))
        return gen

    def transform(self, x: Any) -> Any:
        """`fn(x)` drawing from this subscriber's generators."""
        if self._direct:
            return self.fn(x, generator=self.generator(x.device))
        cpu = self.generator(torch.device("cpu"))
        on_cuda = isinstance(x, torch.Tensor) and x.device.type == "cuda"
        devices = [x.device] if on_cuda else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(cpu.get_state())
            for device in devices:
                torch.cuda.set_rng_state(self.generator(device).get_state(), device)
            out = self.fn(x)
            cpu.set_state(torch.get_rng_state())
            for device in devices:
                self.generator(device).set_state(torch.cuda.get_rng_state(device))
        return out

    def before_batch(self, learn: Any) -> None:
        """Transform the batch's inputs (training batches; validation ones with `valid`)."""
        if not (self.train if learn.mode == "train" else self.valid):
            return
        batch = learn.batch
        if isinstance(batch, Mapping):
            if self.key is None:
                raise TypeError(
                    f"BatchTransformS got a mapping batch (keys {sorted(batch)}): pass key=<the entry to transform>"
                )
            learn.batch = {**batch, self.key: self.transform(batch[self.key])}
        elif isinstance(batch, (tuple, list)):
            items = [self.transform(batch[0]), *batch[1:]]
            learn.batch = type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
        else:
            learn.batch = self.transform(batch)

    def state_dict(self) -> dict[str, Any]:
        """The seed and each generator's state (a mid-epoch checkpoint resumes the same draws)."""
        states = {**self._pending, **{name: g.get_state() for name, g in self._gens.items()}}
        return {"seed": self._base, "generators": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; generators not made yet take their state when made."""
        self._base = state["seed"]
        self._pending = {}
        for name, value in state["generators"].items():
            if name in self._gens:
                self._gens[name].set_state(value)
            else:
                self._pending[name] = value
