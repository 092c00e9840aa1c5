"""Kill campaign: SIGKILL a fit with the training recipes attached at random moments, resume it with
the same line until it finishes, and check the result is bitwise the uninterrupted run's.

    python -m benchmarks.kill_campaign [--kills 20] [--engines native lightning] [--seed 0]

Each engine gets an uninterrupted reference run, then a run that is killed `--kills` times (at a
random moment of its expected duration, so some kills land inside checkpoint and best-weights
writes) and restarted with `fit(EPOCHS, resume="last")` each time. Reported per engine: kills,
kills that left a temporary file (a write was in progress), restarts needed, and whether the final
weights, step count and metric rows equal the reference bitwise. Fits run in child processes.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EPOCHS = 4
CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch, torch.nn.functional as F
from torch.utils.data import TensorDataset
from nntrain import (CheckpointS, DataLoaders, EarlyStoppingS, GradAccumS, GradClipS, Learner, MetricsS,
                     MixedPrecisionS, SaveBestS, SchedulerS)
from nntrain.data import ResumableDataLoader

run, engine, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
g = torch.Generator().manual_seed(0)
x, y = torch.randn(480, 16, generator=g), torch.randint(0, 4, (480,), generator=g)
dls = DataLoaders(ResumableDataLoader(TensorDataset(x[:384], y[:384]), batch_size=16, shuffle=True),
                  ResumableDataLoader(TensorDataset(x[384:], y[384:]), batch_size=32))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 4))
metrics = MetricsS()
metrics.output = lambda row: None
subs = [metrics, SchedulerS(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10, 0.7)),
        MixedPrecisionS(torch.bfloat16), GradAccumS(2), GradClipS(1.0),
        EarlyStoppingS("valid/loss", patience=50), SaveBestS(f"{run}/best.pt", monitor="valid/loss", mode="min"),
        CheckpointS(f"{run}/ck", every_batches=3, keep=3)]
learn = Learner(model, dls, F.cross_entropy, torch.optim.SGD, 0.05, subs)
torch.manual_seed(1)
kw = dict(accelerator="cpu", enable_progress_bar=False) if engine == "lightning" else {}
learn.fit(epochs, resume="last", engine=engine, **kw)
torch.save({"weights": learn.model.state_dict(), "step": learn.global_step, "rows": metrics.history},
           f"{run}/final.pt")
"""


def child(run: Path, engine: str) -> subprocess.Popen:
    """Start the fit (resuming from `run`'s checkpoints, if any) in a child process."""
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run), engine, str(EPOCHS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(run: Path, engine: str) -> float:
    """Run the fit to its end; return its wall time."""
    start = time.monotonic()
    proc = child(run, engine)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} fit in {run} failed:\n{err}")
    return time.monotonic() - start


def temporaries(run: Path) -> list[Path]:
    """Temporary files a killed writer left (checkpoints and the best-weights file)."""
    return list(run.rglob(".*.tmp"))


def same_run(got: dict, ref: dict) -> bool:
    """Bitwise the same weights, step count and last epoch's metric rows."""
    import torch

    return got["step"] == ref["step"] and got["rows"][-2:] == ref["rows"][-2:] and \
        all(torch.equal(got["weights"][k], v) for k, v in ref["weights"].items())


def campaign(engine: str, kills: int, rng: random.Random, root: Path) -> dict:
    """Reference run, then runs of the same fit each SIGKILLed at random moments and resumed
    until it finishes, until `kills` kills are done."""
    import torch

    ref_dir = root / f"{engine}-ref"
    ref_dir.mkdir()
    duration = finish(ref_dir, engine)
    ref = torch.load(ref_dir / "final.pt", weights_only=True)
    done, in_write, starts, runs, equal = 0, 0, 0, 0, 0
    while done < kills:
        run = root / f"{engine}-run{runs}"
        run.mkdir()
        runs += 1
        while True:  # kill this run at random moments until it finishes (or the kills are done)
            proc = child(run, engine)
            starts += 1
            time.sleep(rng.uniform(0.0, duration))
            if proc.poll() is not None or done >= kills:
                _, err = proc.communicate(timeout=600)
                if proc.returncode != 0:
                    raise RuntimeError(f"{engine} fit in {run} failed after a kill:\n{err}")
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            done += 1
            in_write += bool(temporaries(run))
        equal += same_run(torch.load(run / "final.pt", weights_only=True), ref)
    return {"engine": engine, "kills": done, "kills_inside_a_write": in_write, "starts": starts, "runs": runs,
            "runs_bitwise_equal": equal, "reference_seconds": round(duration, 1), "steps": ref["step"]}


def main() -> None:
    """Run the campaign and print one JSON line per engine."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per engine")
    parser.add_argument("--engines", nargs="+", default=["native", "lightning"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            print(json.dumps(campaign(engine, args.kills, rng, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
