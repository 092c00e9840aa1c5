"""`Learner.summary()`: the model's layers with their output shapes on one batch, their parameter
counts and whether they train or are frozen, then the totals and the learner's setup (fastai's
`Learner.summary`, Keras's `model.summary()`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nntrain.devices import model_device, to_device

__all__ = ["LayerRow", "Summary", "summarize", "describe_output"]


@dataclass
class LayerRow:
    """One row of a `Summary`: a layer's name (its path in the model) and class, the shape of
    its output on the batch, its own parameter count and whether they train ("yes", "no",
    "partly"; "" without parameters)."""

    name: str
    kind: str
    output: str
    params: int
    trainable: str


def describe_output(out: Any) -> str:
    """A layer output's shape as `16 x 8` (several, for a tuple or a mapping: comma-separated);
    the type's name for anything else."""
    if isinstance(out, torch.Tensor):
        return " x ".join(str(d) for d in out.shape) or "scalar"
    if isinstance(out, (tuple, list)):
        return ", ".join(describe_output(o) for o in out)
    if isinstance(out, Mapping):
        return ", ".join(f"{k}: {describe_output(v)}" for k, v in out.items())
    if isinstance(getattr(out, "logits", None), torch.Tensor):  # a Hugging Face output
        return describe_output(out.logits)
    return type(out).__name__


def _trainable(params: list[nn.Parameter]) -> str:
    if not params:
        return ""
    flags = {p.requires_grad for p in params}
    return "partly" if len(flags) == 2 else ("yes" if True in flags else "no")


class Summary:
    """What `Learner.summary()` returns: prints as a table (its `str` and `repr`); the rows and
    totals are attributes.

    Attributes:
        model: the model's class name.
        input: the shape of the batch's inputs.
        rows: one `LayerRow` per call of a layer (a leaf module, or a module with parameters of
            its own) in the order they ran, then the layers the batch did not reach.
        total, trainable, frozen: parameter counts over the whole model (shared ones once).
        notes: the learner's setup (optimizer, loss, frozen groups, subscribers), one per line.
    """

    def __init__(
        self, model: str, input: str, rows: list[LayerRow], total: int, trainable: int, notes: list[str]
    ) -> None:
        self.model, self.input, self.rows = model, input, rows
        self.total, self.trainable, self.frozen = total, trainable, total - trainable
        self.notes = notes

    def __str__(self) -> str:
        header = ("Layer (type)", "Output shape", "Params", "Trains")
        cells = [header, *((f"{r.name} ({r.kind})", r.output, f"{r.params:,}", r.trainable) for r in self.rows)]
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        line = lambda c: "  ".join(  # noqa: E731
            c[i].ljust(widths[i]) if i in (0, 1) else c[i].rjust(widths[i]) for i in range(len(c))
        ).rstrip()
        rule = "=" * len(line(header))
        lines = [
            f"{self.model} (input: {self.input})",
            rule,
            line(header),
            rule,
            *map(line, cells[1:]),
            rule,
            f"Total params: {self.total:,}",
            f"Trainable params: {self.trainable:,}",
            f"Frozen params: {self.frozen:,}",
            "",
            *self.notes,
        ]
        return "\n".join(lines)

    __repr__ = __str__


def _first_batch(learn: Any) -> Any:
    for dl in (learn.dls.valid, learn.dls.train):
        try:
            return next(iter(dl))
        except StopIteration:
            continue
    raise ValueError(
        "summary() runs the model on one batch, but both loaders are empty: pass a batch, learn.summary(batch)"
    )


def summarize(learn: Any, batch: Any = None) -> Summary:
    """Run the model on one batch (by default the validation loader's first; the random number
    generators are left as they were) in eval mode without grad, and describe every layer.

    The model, its mode and the loaders are left unchanged. `batch` may be a loader's batch
    (`(inputs, targets)`, a mapping) or the inputs alone.
    """
    model = learn.model
    if batch is None:
        with torch.random.fork_rng(devices=[]):  # making a loader's iterator draws a seed
            batch = _first_batch(learn)
    inputs = learn.split_batch(batch)[0] if isinstance(batch, (tuple, list, Mapping)) else batch
    inputs = to_device(inputs, model_device(model))
    names = {m: name or type(model).__name__ for name, m in model.named_modules()}
    layers = [
        m
        for m in model.modules()
        if not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False))
    ]
    rows: list[LayerRow] = []
    called: set[nn.Module] = set()

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        called.add(module)
        own = list(module.parameters(recurse=False))
        rows.append(
            LayerRow(
                names[module], type(module).__name__, describe_output(out), sum(p.numel() for p in own), _trainable(own)
            )
        )

    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            learn.call_model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for m in layers:
        if m not in called:
            own = list(m.parameters(recurse=False))
            rows.append(
                LayerRow(names[m], type(m).__name__, "(not called)", sum(p.numel() for p in own), _trainable(own))
            )
    params = list(model.parameters())
    return Summary(
        type(model).__name__,
        describe_output(inputs),
        rows,
        sum(p.numel() for p in params),
        sum(p.numel() for p in params if p.requires_grad),
        _notes(learn),
    )


def _notes(learn: Any) -> list[str]:
    from nntrain.freeze import frozen_groups, param_groups

    opt = learn.opt
    optimizer = (
        type(opt).__name__
        if opt is not None
        else f"{getattr(learn.optim_class, '__name__', repr(learn.optim_class))} (made at the first fit)"
    )
    loss = getattr(learn.loss_fn, "__name__", type(learn.loss_fn).__name__)
    notes = [f"Optimizer: {optimizer}, lr {learn.lr}", f"Loss function: {loss}"]
    frozen = frozen_groups(learn)
    if frozen:
        n = len(param_groups(learn.model, learn.splitter))
        notes.append(f"Frozen: the first {frozen} of {n} parameter groups (unfreeze() trains them all)")
    if learn.subs:
        notes.append("Subscribers: " + ", ".join(type(s).__name__ for s in learn.subs))
    return notes
