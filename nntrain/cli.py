"""`nntrain fit`: train a small MLP on the embedded digits (or a hub dataset) and print the epoch table."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["main", "build_parser", "make_model"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _momentum(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `nntrain` command."""
    parser = argparse.ArgumentParser(prog="nntrain", description="nntrain: train with the Learner or Lightning.")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="train an MLP on an image-classification dataset")
    fit.add_argument("--epochs", type=_positive_int, default=5, help="number of epochs (default 5)")
    fit.add_argument("--lr", type=_positive_float, default=0.1, help="learning rate (default 0.1)")
    fit.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default 64)")
    fit.add_argument("--momentum", type=_momentum, default=0.0,
                     help="> 0 trains with MomentumLearner(mom=MOMENTUM) (default 0: plain SGD)")
    fit.add_argument("--hidden", type=_positive_int, default=50, help="hidden units of the MLP (default 50)")
    fit.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    fit.add_argument("--dataset", default="digits",
                     help="'digits' (embedded, default) or a Hugging Face dataset name with image+label columns")
    fit.add_argument("--engine", choices=("native", "lightning"), default="native",
                     help="run on nntrain's Learner or on lightning.Trainer (default native)")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar, plain rows")
    return parser


def make_model(n_in: int, n_hidden: int, n_out: int) -> nn.Module:
    """The seed's MLP: Linear, ReLU, Linear."""
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device name (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def _quiet_lightning() -> None:
    """Keep the epoch table readable: Lightning's banner and hints are not the user's business here."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def run_fit(args: argparse.Namespace) -> int:
    """Train as `args` say; return the exit code."""
    from torcheval.metrics import MulticlassAccuracy

    from nntrain.data import DataLoaders, load_dataset_dict
    from nntrain.learner import Learner, MomentumLearner
    from nntrain.subscribers.device import DeviceS
    from nntrain.subscribers.metrics import MetricsS
    from nntrain.subscribers.progress import ProgressS

    device = _device(args.device)
    torch.manual_seed(args.seed)
    try:
        dd = load_dataset_dict(args.dataset)
    except RuntimeError as exc:  # the hub could not be reached or has no such dataset
        raise ValueError(str(exc)) from exc
    dls = DataLoaders.from_hf_dd(dd, batch_size=args.batch_size)
    x, _ = next(iter(dls.valid))
    n_classes = dls.train.dataset.y.max().item() + 1
    model = make_model(x.shape[1], args.hidden, int(n_classes))
    subs = [MetricsS(accuracy=MulticlassAccuracy()), DeviceS(device)]
    if not args.no_progress:
        subs.append(ProgressS())
    if args.momentum > 0:
        learn = MomentumLearner(model, dls, F.cross_entropy, torch.optim.SGD, args.lr, subs, mom=args.momentum)
    else:
        learn = Learner(model, dls, F.cross_entropy, torch.optim.SGD, args.lr, subs)
    if args.engine == "lightning":
        _quiet_lightning()
    print(f"nntrain fit: {args.dataset}, {len(dls.train.dataset)} train / {len(dls.valid.dataset)} valid samples, "
          f"{type(learn).__name__}, engine={args.engine}, device={device}")
    learn.fit(args.epochs, engine=args.engine)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nntrain` console command."""
    args = build_parser().parse_args(argv)
    try:
        return run_fit(args)
    except ValueError as exc:
        print(f"nntrain: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nntrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
