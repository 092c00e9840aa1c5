"""`nntrain fit`: train a small MLP on the embedded digits (or a hub dataset), print the epoch table and
write a TensorBoard run (optionally an LR-finder plot, the loss curves and the training-recipe
subscribers: one-cycle, mixed precision, clipping, accumulation, early stopping, best weights).

torch and the rest of nntrain are imported inside the functions that train, so `nntrain --help`
and `nntrain --version` answer without loading them."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["main", "build_parser", "make_model"]

PRECISIONS = ("32", "bf16", "16")
BEST_METRIC = "valid/accuracy"  # `MetricsS(accuracy=...)` in `run_fit` logs it under this name


def _number(text: str, kind: type, what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def _int(text: str) -> int:
    return _number(text, int, "an integer")


def _positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float, "a finite number > 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _momentum(text: str) -> float:
    value = _number(text, float, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nntrain")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `nntrain` command (building it imports no torch)."""
    parser = _Parser(prog="nntrain", description="nntrain: train with the Learner or Lightning.")
    parser.add_argument("--version", action="version", version=f"nntrain {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fit = commands.add_parser("fit", help="train an MLP on an image-classification dataset")
    fit.add_argument("--epochs", type=_positive_int, default=5, help="number of epochs (default 5)")
    fit.add_argument("--lr", type=_positive_float, default=0.1, help="learning rate (default 0.1)")
    fit.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default 64)")
    fit.add_argument(
        "--momentum",
        type=_momentum,
        default=0.0,
        help="> 0 trains with MomentumLearner(mom=MOMENTUM) (default 0: plain SGD)",
    )
    fit.add_argument("--hidden", type=_positive_int, default=50, help="hidden units of the MLP (default 50)")
    fit.add_argument("--seed", type=_int, default=42, help="random seed (default 42)")
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    fit.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (embedded, default) or a Hugging Face dataset name with image+label columns",
    )
    fit.add_argument(
        "--engine",
        choices=("native", "lightning"),
        default="native",
        help="run on nntrain's Learner or on lightning.Trainer (default native)",
    )
    fit.add_argument("--no-progress", action="store_true", help="no progress bar, plain rows")
    fit.add_argument(
        "--logdir",
        default="runs",
        help="TensorBoard root: the run goes to LOGDIR/<engine>-<time>/version_N (default runs/)",
    )
    fit.add_argument(
        "--lr-find",
        action="store_true",
        help="run the LR finder first, print its suggestion and save lr_find.png in the run directory",
    )
    fit.add_argument("--plot", action="store_true", help="save the loss curves as losses.png in the run directory")
    recipe = fit.add_argument_group("training recipe (both engines)")
    recipe.add_argument(
        "--one-cycle", action="store_true", help="one-cycle lr schedule peaking at --lr (default off: constant lr)"
    )
    recipe.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="32",
        help="autocast to bf16, or to 16 with loss scaling (default 32: off)",
    )
    recipe.add_argument(
        "--clip",
        type=_positive_float,
        metavar="MAX_NORM",
        help="clip the gradients' total norm to MAX_NORM (default off)",
    )
    recipe.add_argument(
        "--accumulate",
        type=_positive_int,
        default=1,
        metavar="N",
        help="one optimizer step every N batches (default 1)",
    )
    recipe.add_argument(
        "--early-stop",
        type=_positive_int,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without a lower valid/loss (default off)",
    )
    recipe.add_argument(
        "--save-best", metavar="PATH", help=f"keep the weights of the best epoch by {BEST_METRIC} in PATH (default off)"
    )
    return parser


def _check_recipe(args: argparse.Namespace) -> None:
    """Refuse, before any loading or training, recipe options that cannot do what they say.

    Raises:
        ValueError: a `--save-best` path that is a directory or lies under a file.
    """
    if args.save_best is not None:
        path = Path(args.save_best)
        if path.is_dir():
            raise ValueError(f"--save-best {path} is a directory: give a file name (e.g. {path / 'best.pt'})")
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ValueError(f"--save-best {path}: {parent} is not a writable directory")


def _recipe_subs(args: argparse.Namespace) -> list[Any]:
    """The subscribers the recipe options ask for (`MixedPrecisionS`, `GradClipS`, ...)."""
    import torch

    from nntrain.subscribers import (
        EarlyStoppingS,
        GradAccumS,
        GradClipS,
        MixedPrecisionS,
        SaveBestS,
    )

    subs: list[Any] = []
    if args.precision != "32":
        subs.append(MixedPrecisionS(torch.bfloat16 if args.precision == "bf16" else torch.float16))
    if args.clip is not None:
        subs.append(GradClipS(args.clip))
    if args.accumulate > 1:
        subs.append(GradAccumS(args.accumulate))
    if args.early_stop is not None:
        subs.append(EarlyStoppingS(monitor="valid/loss", mode="min", patience=args.early_stop))
    if args.save_best is not None:
        subs.append(SaveBestS(args.save_best, monitor=BEST_METRIC, mode="max"))
    return subs


def _report_recipe(subs: Sequence[Any], epochs: int) -> None:
    """One line each for an early stop and the best weights."""
    from nntrain.subscribers import EarlyStoppingS, SaveBestS

    for sub in subs:
        if isinstance(sub, EarlyStoppingS) and sub.stopped_epoch is not None and sub.stopped_epoch + 1 < epochs:
            print(
                f"early stop: after epoch {sub.stopped_epoch} ({sub.monitor} did not improve for "
                f"{sub.wait} epoch{'s' if sub.wait != 1 else ''})"
            )
        if isinstance(sub, SaveBestS):
            if sub.best_path is None:
                print(f"best weights: none saved ({sub.monitor} was never finite)")
            else:
                print(f"best weights: {sub.best_path} ({sub.monitor} {sub.best_score:.4f} at epoch {sub.best_epoch})")


def make_model(n_in: int, n_hidden: int, n_out: int) -> nn.Module:
    """The seed's MLP: Linear, ReLU, Linear."""
    from torch import nn

    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device name (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def run_fit(args: argparse.Namespace) -> int:
    """Train as `args` say; return the exit code.

    Raises:
        ValueError: options that cannot work (a bad device, a dataset that cannot be loaded, ...).
        OSError: a log directory or file that cannot be written.
        FitInterrupted: Ctrl-C (or SIGTERM, under `main`) stopped the LR finder or the fit.
    """
    engine = " and Lightning" if args.engine == "lightning" else ""
    print(f"nntrain: importing torch{engine}, loading {args.dataset}...", flush=True)  # before seconds of imports
    import torch
    import torch.nn.functional as F
    from torcheval.metrics import MulticlassAccuracy

    from nntrain.data import DataLoaders, load_dataset_dict
    from nntrain.learner import Learner, MomentumLearner
    from nntrain.subscribers.device import DeviceS
    from nntrain.subscribers.metrics import MetricsS
    from nntrain.subscribers.progress import ProgressS
    from nntrain.subscribers.tensorboard import TensorBoardS, make_log_dir

    device = _device(args.device)
    if args.plot and args.no_progress:
        raise ValueError("--plot draws from the progress display; drop --no-progress")
    _check_recipe(args)
    make_log_dir(args.logdir)  # an unusable log directory fails now, not after loading and training
    torch.manual_seed(args.seed)
    try:
        dd = load_dataset_dict(args.dataset)
    except RuntimeError as exc:  # the hub could not be reached or has no such dataset
        raise ValueError(str(exc)) from exc
    dls = DataLoaders.from_hf_dd(dd, batch_size=args.batch_size)
    x, _ = next(iter(dls.valid))
    n_classes = dls.train.dataset.y.max().item() + 1  # type: ignore[attr-defined]  # from_hf_dd's TensorPairDataset
    model = make_model(x.shape[1], args.hidden, int(n_classes))
    subs = [DeviceS(device)]
    progress = None if args.no_progress else ProgressS(plot=args.plot)
    learn: Learner
    if args.momentum > 0:
        learn = MomentumLearner(model, dls, F.cross_entropy, torch.optim.SGD, args.lr, subs, mom=args.momentum)
    else:
        learn = Learner(model, dls, F.cross_entropy, torch.optim.SGD, args.lr, subs)
    print(
        f"nntrain fit: {args.dataset}, {len(dls.train.dataset)} train / {len(dls.valid.dataset)} valid samples, "  # type: ignore[arg-type]
        f"{type(learn).__name__}, engine={args.engine}, device={device}"
    )
    run_name = f"{args.engine}-{time.strftime('%Y%m%d-%H%M%S')}"
    tensorboard = TensorBoardS(args.logdir, run_name)
    # Attached for the training fit only, so the LR finder's search prints no rows and logs nothing.
    recipe = _recipe_subs(args)
    fit_subs = [
        MetricsS(accuracy=MulticlassAccuracy()),
        tensorboard,
        *([progress] if progress is not None else []),
        *recipe,
    ]
    finder = None
    try:
        if args.lr_find:
            finder = learn.lr_find(engine=args.engine)
            others = ", ".join(
                f"{name} {lr:.2e}" for name, lr in finder.suggestions.items() if name != "valley" and lr is not None
            )
            print(
                f"lr finder: suggested lr {finder.suggestion():.2e} (valley; {others}; this run uses --lr {args.lr:g})"
            )
        # Under Lightning the bridge gives the Trainer a TensorBoardLogger at the TensorBoardS's place.
        if args.one_cycle:
            learn.fit_one_cycle(args.epochs, lr_max=args.lr, engine=args.engine, subs=fit_subs)
        else:
            learn.fit(args.epochs, engine=args.engine, subs=fit_subs)
    except BaseException as exc:
        if not _is_interrupt(exc):
            raise
        raise FitInterrupted(_stopped_at(learn.epoch, args.epochs, tensorboard, recipe)) from exc
    _report_recipe(recipe, args.epochs)
    run_dir = Path(tensorboard.log_dir)  # type: ignore[arg-type]  # set by the fit
    if finder is not None:
        finder.plot().savefig(run_dir / "lr_find.png", format="png")
        print(f"lr finder plot: {run_dir / 'lr_find.png'}")
    if progress is not None and args.plot:
        progress.save_plot(run_dir / "losses.png")
        print(f"loss curves: {run_dir / 'losses.png'}")
    print(f"TensorBoard run: {run_dir}; view it with: tensorboard --logdir {shlex.quote(args.logdir)}")
    return 0


class FitInterrupted(Exception):
    """Ctrl-C (or SIGTERM under `main`) stopped `run_fit`'s LR finder or fit after the fit's cleanups
    ran; the message says how far it got and what it left on disk."""


def _is_interrupt(exc: BaseException) -> bool:
    """Whether `exc` is Ctrl-C, as the native loop raises it or as Lightning ends it: Lightning's Trainer
    catches the KeyboardInterrupt, runs its teardown and calls `sys.exit(1)` inside that handler."""
    return isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)
    )


def _stopped_at(epoch: int, epochs: int, tensorboard: Any, recipe: Sequence[Any]) -> str:
    """'in epoch E (E of N epochs finished); TensorBoard run: DIR; best weights: PATH (epoch B)'."""
    from nntrain.subscribers import SaveBestS

    if tensorboard.log_dir is None:  # the fit had not started: LR finder, or before its first event
        return "before training"
    parts = [f"in epoch {epoch} ({epoch} of {epochs} epochs finished)", f"TensorBoard run: {tensorboard.log_dir}"]
    parts += [
        f"best weights: {sub.best_path} (epoch {sub.best_epoch})"
        for sub in recipe
        if isinstance(sub, SaveBestS) and sub.best_path is not None
    ]
    return "; ".join(parts)


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[list[signal.Signals]]:
    """Within the block SIGTERM stops the fit the way Ctrl-C does (the fit's cleanups run; a checkpoint
    write in progress finishes first, see `sigint_deferred`) and is recorded in the list yielded, so the
    exit status can name it. Outside the main thread, where no handler can be set, nothing changes."""
    received: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum))
        on_sigint = signal.getsignal(signal.SIGINT)
        if not callable(on_sigint):  # SIGINT ignored: a background job, or Lightning already shutting down
            raise KeyboardInterrupt
        on_sigint(signal.SIGINT, frame)  # Python's raises KeyboardInterrupt; sigint_deferred's holds it

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nntrain` console command.

    Returns:
        The exit status: 0 done, 1 an error (one line on stderr), 130 stopped by Ctrl-C (SIGINT),
        143 stopped by SIGTERM (128 + the signal's number, as a shell reports a killed command).
    """
    args = build_parser().parse_args(argv)
    with _sigterm_as_ctrl_c() as received:
        try:
            return run_fit(args)
        except (ValueError, OSError) as exc:
            print(f"nntrain: error: {exc}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, FitInterrupted) as exc:
            stopped = received[0] if received else signal.SIGINT
            where = str(exc) if isinstance(exc, FitInterrupted) else "before training"
            print(f"nntrain: interrupted ({stopped.name}) {where}", file=sys.stderr)
            return 128 + stopped
        except Exception as exc:
            from nntrain.checkpoint import CheckpointError  # imported by the fit already

            if not isinstance(exc, CheckpointError):  # a full disk under --save-best: one line too
                raise
            print(f"nntrain: error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
