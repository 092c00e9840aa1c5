"""Training throughput: raw PyTorch vs the native Learner vs plain Lightning vs the bridge.

    python -m benchmarks.throughput [--quick] [--device cpu|cuda] [--out DIR]
    python -m benchmarks.throughput --recipes [--quick] [--repeats N]   # the recipes instead (~2 min on 2 CPU cores)

Three workloads on synthetic batches made once on the device (so the loader costs nothing and
every loop iterates the same tensors): the seed MLP, a small CNN with BatchNorm, and a tiny
linear model where per-step overhead dominates. Each loop times one training epoch, set-up
excluded: raw PyTorch around its `for` loop, the Learner from `before_epoch` to `after_epoch`
(a last-ordered subscriber), Lightning from `on_train_epoch_start` to `on_train_epoch_end` (a
callback; Trainer construction, `setup`, optimizer set-up and validation are outside). After a
warm-up epoch per loop, the loops run in interleaved, rotating order, and medians are reported.

`--recipes` times, instead, the native Learner on the tiny workload alone and with each recipe
subscriber (schedules, mixed precision, clipping, accumulation, early stopping, best-model saving;
`RECIPES`) in the same interleaved way, and reports each recipe's median paired difference in
µs per training batch and its time ratio over its baseline (the bare Learner, or the Learner with
`MetricsS` for the recipes that monitor a logged value). Timed there: the training pass and a short
validation pass (per-epoch work such as `SaveBestS`'s file write is inside), per training batch.
It writes `throughput_recipes.{jsonl,md,png}`.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torcheval.metrics import MulticlassAccuracy

import nntrain.adapters
from benchmarks.common import (
    base_parser,
    clock,
    env_info,
    markdown_table,
    median,
    report,
    setup_device,
    since,
    spread,
    sync,
    target_line,
)
from nntrain import EarlyStoppingS, GradAccumS, GradClipS, MixedPrecisionS, OneCycle, SaveBestS, SchedulerS
from nntrain.learner import Learner, Subscriber
from nntrain.logs import quiet_loggers
from nntrain.subscribers.metrics import MetricsS

SEED = 0
LR = 0.1
N_DISTINCT = 16  # distinct batches; an epoch cycles through them
LOOPS = ("raw", "learner", "learner+metrics", "lightning", "bridge", "bridge+metrics")


def seed_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))


def small_cnn() -> nn.Module:
    def block(ni: int, nf: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(ni, nf, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())

    # 28 -> 14 -> 7 -> 4 -> 2 -> 1
    return nn.Sequential(block(1, 8), block(8, 16), block(16, 32), block(32, 64),
                         nn.Conv2d(64, 10, 3, stride=2, padding=1), nn.Flatten())


def tiny_linear() -> nn.Module:
    return nn.Linear(784, 10)


# name: (model, input shape, batch size, steps per timed epoch, interleaved repeats) of a full run;
# tiny gets the most repeats: its targets are a few µs on a ~250 µs step
WORKLOADS = {
    "mlp": (seed_mlp, (784,), 1024, 60, 21),
    "cnn": (small_cnn, (1, 28, 28), 256, 20, 21),
    "tiny": (tiny_linear, (784,), 64, 500, 51),
}
QUICK_STEPS = 3
VALID_BATCHES = 4  # the recipes' validation pass: short, but it ends the epoch that EarlyStoppingS/SaveBestS judge

FP16_SYNC = ("on CUDA syncs with the host every applied step: GradScaler.step reads found_inf (.item()), then "
             "GradScaling.step reads bool(scale < before)")
# recipe: (baseline it is paired with, its subscribers made from (optimizer steps per fit, a scratch folder), note)
RECIPES: dict[str, tuple[str | None, Callable[[int, Path], list[Subscriber]], str]] = {
    "learner": (None, lambda steps, tmp: [], "baseline"),
    "learner+metrics": ("learner", lambda steps, tmp: [metrics_s()], "baseline of the monitoring recipes"),
    "SchedulerS(StepLR)": ("learner", lambda steps, tmp: [
        SchedulerS(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 100, 0.5))], ""),
    "SchedulerS(OneCycle)": ("learner", lambda steps, tmp: [
        SchedulerS(lambda opt: OneCycle(opt, steps, lr_max=0.1))], ""),
    "MixedPrecisionS(bf16)": ("learner", lambda steps, tmp: [MixedPrecisionS(torch.bfloat16)], ""),
    "MixedPrecisionS(fp16)": ("learner", lambda steps, tmp: [MixedPrecisionS(torch.float16)], FP16_SYNC),
    "GradClipS(1.0)": ("learner", lambda steps, tmp: [GradClipS(1.0)], ""),
    "GradAccumS(2)": ("learner", lambda steps, tmp: [GradAccumS(2)], "one optimizer step per 2 batches"),
    "EarlyStoppingS+metrics": ("learner+metrics", lambda steps, tmp: [
        EarlyStoppingS(monitor="valid/loss"), metrics_s()], ""),
    "SaveBestS+metrics": ("learner+metrics", lambda steps, tmp: [
        SaveBestS(tmp / "best.pt", monitor="valid/loss", mode="min"), metrics_s()],
        "writes best.pt after each epoch whose valid/loss improves (every epoch here)"),
}


class Batches:
    """A fixed list of batches with a length (Lightning would read a bare list as several loaders)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EpochTimer(Subscriber):
    """Times each epoch of a Learner: ordered last, so other subscribers' `after_epoch` is inside."""

    order = 10_000
    one_rank_cancels = False  # a timer: never cancels

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def before_epoch(self, learn) -> None:
        gc.collect()
        sync(self.device)
        self.t0 = clock()

    def after_epoch(self, learn) -> None:
        sync(self.device)
        self.times.append(since(self.t0))


class RecipeTimer(Subscriber):
    """Times each epoch of a Learner from the training pass's `before_epoch` to the validation
    pass's `after_epoch` (ordered last: the other subscribers' per-epoch work is inside) and counts
    the optimizer steps of the training pass."""

    order = 10_000
    one_rank_cancels = False  # a timer: never cancels

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self.opt_steps = device, [], []

    def before_epoch(self, learn) -> None:
        if learn.mode == "train":
            gc.collect()
            sync(self.device)
            self.step0 = learn.global_step
            self.t0 = clock()

    def after_epoch(self, learn) -> None:
        if learn.mode == "train":
            self.opt_steps.append(learn.global_step - self.step0)
        else:
            sync(self.device)
            self.times.append(since(self.t0))


class LightningEpochTimer(L.Callback):
    """Times each training epoch under a Trainer; put it after the bridge's callbacks."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        gc.collect()
        sync(self.device)
        self.t0 = clock()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync(self.device)
        self.times.append(since(self.t0))


class PlainModule(L.LightningModule):
    """The plain LightningModule: automatic optimization, same model, loss and SGD."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def metrics_s() -> MetricsS:
    m = MetricsS(accuracy=MulticlassAccuracy())
    m.sink = lambda row: None  # no printing; the row is still computed each epoch
    return m


def raw_runner(model: nn.Module, batches: Any, device: torch.device) -> Callable[[], tuple[float, float]]:
    """The raw PyTorch loop (forward, loss, backward, SGD step, zero_grad; no metrics) over
    `batches`, on its own copy of `model`; returns the timed (wall, CPU) seconds of one epoch."""
    raw_model = copy.deepcopy(model).train()
    raw_opt = torch.optim.SGD(raw_model.parameters(), lr=LR)

    def raw() -> tuple[float, float]:
        gc.collect()
        sync(device)
        t0 = clock()
        for x, y in batches:
            loss = F.cross_entropy(raw_model(x), y)
            loss.backward()
            raw_opt.step()
            raw_opt.zero_grad()
        sync(device)
        return since(t0)

    return raw


def make_runners(model: nn.Module, batches: Batches, device: torch.device
                 ) -> dict[str, Callable[[], tuple[float, float]]]:
    """One callable per loop; each trains one epoch over `batches` on its own copy of `model`
    and returns the timed (wall, CPU) seconds."""
    runners = {}

    runners["raw"] = raw_runner(model, batches, device)

    def learner(subs: list[Subscriber], engine: str) -> Callable[[], tuple[float, float]]:
        dls = SimpleNamespace(train=batches, valid=batches)
        learn = Learner(copy.deepcopy(model), dls, F.cross_entropy, torch.optim.SGD, LR, subs=subs)
        if engine == "native":
            timer = EpochTimer(device)
            learn.add_subs([timer])
        else:
            timer = LightningEpochTimer(device)  # fit_lightning puts it after the subscribers' callbacks

        def run() -> tuple[float, float]:
            if engine == "native":
                learn.fit(1, valid=False)
            else:
                learn.fit(1, valid=False, engine="lightning", callbacks=[timer])
            return timer.times[-1]

        return run

    runners["learner"] = learner([], "native")
    runners["learner+metrics"] = learner([metrics_s()], "native")

    plain = PlainModule(copy.deepcopy(model))
    options = nntrain.adapters.trainer_defaults(device)  # the same as the bridge's
    ptimer = LightningEpochTimer(device)

    def lightning() -> tuple[float, float]:
        trainer = L.Trainer(max_epochs=1, limit_val_batches=0, callbacks=[ptimer], **options)
        trainer.fit(plain, train_dataloaders=batches)
        return ptimer.times[-1]

    runners["lightning"] = lightning
    runners["bridge"] = learner([], "lightning")
    runners["bridge+metrics"] = learner([metrics_s()], "lightning")
    assert tuple(runners) == LOOPS
    return runners


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's per-Trainer banners and the warnings that do not apply here, then restore."""
    with warnings.catch_warnings(), quiet_loggers(("lightning.pytorch", "lightning.fabric", "lightning"),
                                                  logging.ERROR):
        warnings.filterwarnings("ignore", module=r"lightning\..*")
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|smaller than the logging interval).*")
        yield


def paired(a: list[float], b: list[float]) -> float:
    """Median of the per-repeat differences `a - b`: drift between repeats cancels."""
    return median([x - y for x, y in zip(a, b)])


def make_batches(shape: tuple[int, ...], bs: int, steps: int, device: torch.device) -> Batches:
    """`steps` batches cycling through `min(steps, N_DISTINCT)` distinct random ones, made on `device`."""
    g = torch.Generator().manual_seed(SEED)
    distinct = [(torch.randn(bs, *shape, generator=g).to(device), torch.randint(0, 10, (bs,), generator=g).to(device))
                for _ in range(min(steps, N_DISTINCT))]
    return Batches([distinct[i % len(distinct)] for i in range(steps)])


def interleaved(runners: dict[str, Callable[[], tuple[float, float]]], repeats: int
                ) -> dict[str, list[tuple[float, float]]]:
    """One warm-up call of each runner, then `repeats` rounds calling each once in rotating order
    (so none always runs after the same one); the (wall, CPU) seconds of the rounds, by name."""
    names = tuple(runners)
    for run in runners.values():
        run()
    gc.collect()
    gc.freeze()  # the timers' gc.collect() then skips the long-lived objects (torch, Lightning): 200 ms -> ~1 ms
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    try:
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(runners[name]())
    finally:
        gc.unfreeze()
    return times


def run_workload(wname: str, make_model: Callable[[], nn.Module], shape: tuple[int, ...], bs: int, steps: int,
                 repeats: int, device: torch.device) -> list[dict]:
    """Time every loop on one workload; one result row per loop."""
    batches = make_batches(shape, bs, steps, device)
    torch.manual_seed(SEED)
    runners = make_runners(make_model().to(device), batches, device)
    times = interleaved(runners, repeats)

    us = {name: [wall / steps * 1e6 for wall, _ in ts] for name, ts in times.items()}
    cpu = {name: [c / steps * 1e6 for _, c in ts] for name, ts in times.items()}
    raw_us = median(us["raw"])
    rows = []
    for name in LOOPS:
        m = median(us[name])
        row = dict(workload=wname, loop=name, batch_size=bs, steps=steps, repeats=repeats,
                   samples_per_s=bs / m * 1e6, us_per_step=m, us_per_step_iqr=spread(us[name]),
                   ratio_to_raw=raw_us / m, overhead_us_per_step=paired(us[name], us["raw"]),
                   over_lightning_us_per_step=paired(us[name], us["lightning"]),
                   cpu_us_per_step=median(cpu[name]), cpu_overhead_us_per_step=paired(cpu[name], cpu["raw"]),
                   cpu_over_lightning_us_per_step=paired(cpu[name], cpu["lightning"]))
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def run_fast_path(steps: int, repeats: int, device: torch.device) -> list[dict]:
    """The seed MLP, raw eager loop vs the fast path (data shuffled on the device, step compiled;
    CUDA graphs on CUDA), interleaved; losses of the first step compared."""
    from nntrain.fastpath import CompiledLearner, DeviceDataLoader

    _, shape, bs, _, _ = WORKLOADS["mlp"]
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(steps * bs, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (steps * bs,), generator=g).to(device)
    torch.manual_seed(SEED)
    model = seed_mlp().to(device)
    raw = raw_runner(model, [(x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]) for i in range(steps)], device)

    train = DeviceDataLoader(x, y, bs, shuffle=True, drop_last=True)
    timer = EpochTimer(device)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    fast_learn = CompiledLearner(copy.deepcopy(model), SimpleNamespace(train=train, valid=train), F.cross_entropy,
                                 torch.optim.SGD, LR, subs=[timer], mode=mode)

    def fast() -> tuple[float, float]:
        fast_learn.fit(1, valid=False)
        return timer.times[-1]

    runners = {"raw": raw, "fast": fast}
    for run in runners.values():  # warm-up (and compilation): two epochs each
        run()
        run()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for r in range(repeats):
        for name in (("raw", "fast") if r % 2 == 0 else ("fast", "raw")):
            times[name].append(runners[name]())
    us = {name: [wall / steps * 1e6 for wall, _ in ts] for name, ts in times.items()}
    raw_us = median(us["raw"])
    rows = []
    for name in runners:
        m = median(us[name])
        row = dict(workload="mlp-fastpath", loop=name, batch_size=bs, steps=steps, repeats=repeats,
                   samples_per_s=bs / m * 1e6, us_per_step=m, us_per_step_iqr=spread(us[name]),
                   ratio_to_raw=raw_us / m, overhead_us_per_step=paired(us[name], us["raw"]),
                   over_lightning_us_per_step=float("nan"), cpu_us_per_step=float("nan"),
                   cpu_overhead_us_per_step=float("nan"), cpu_over_lightning_us_per_step=float("nan"))
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def run_recipes(steps: int, repeats: int, device: torch.device) -> list[dict]:
    """The native Learner on the tiny workload alone and with each of `RECIPES`, interleaved; one
    row per recipe with its paired difference and time ratio over its baseline, per training batch."""
    make_model, shape, bs, _, _ = WORKLOADS["tiny"]
    batches = make_batches(shape, bs, steps, device)
    dls = SimpleNamespace(train=batches, valid=Batches(batches.batches[:VALID_BATCHES]))
    torch.manual_seed(SEED)
    model = make_model().to(device)
    runners, timers = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, make_subs, _) in RECIPES.items():
            timer = timers[name] = RecipeTimer(device)
            learn = Learner(copy.deepcopy(model), dls, F.cross_entropy, torch.optim.SGD, LR,
                            subs=[*make_subs(steps, Path(tmp)), timer])

            def run(learn: Learner = learn, timer: RecipeTimer = timer) -> tuple[float, float]:
                learn.fit(1, lr=LR)  # lr: every fit's schedule starts from LR (StepLR's decay would compound)
                return timer.times[-1]

            runners[name] = run
        times = interleaved(runners, repeats)

    us = {name: [wall / steps * 1e6 for wall, _ in ts] for name, ts in times.items()}
    cpu = {name: [c / steps * 1e6 for _, c in ts] for name, ts in times.items()}
    rows = []
    for name, (base, _, note) in RECIPES.items():
        m, base = median(us[name]), base or name
        opt_steps = timers[name].opt_steps[-1]
        row = dict(workload="tiny", loop=name, baseline=base, batch_size=bs, steps=steps, opt_steps=opt_steps,
                   repeats=repeats, us_per_step=m, us_per_step_iqr=spread(us[name]),
                   us_per_opt_step=median([wall / opt_steps * 1e6 for wall, _ in times[name]]),
                   overhead_us_per_step=paired(us[name], us[base]),
                   time_ratio=median([x / y for x, y in zip(us[name], us[base])]),
                   cpu_us_per_step=median(cpu[name]), cpu_overhead_us_per_step=paired(cpu[name], cpu[base]),
                   note=note)
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def report_recipes(args: Any, device: torch.device, env: dict[str, Any]) -> list[dict]:
    """Run the recipes comparison (`--recipes`); print and write its results. Returns the rows."""
    steps, repeats = (QUICK_STEPS, 1) if args.quick else WORKLOADS["tiny"][3:]
    rows = run_recipes(steps, args.repeats or repeats, device)
    where = f"{device.type.upper()} tiny"
    targets = [target_line(f"{where}: {r['loop']} over {r['baseline']}", "(reported)",
                           f"{r['overhead_us_per_step']:+.1f} us/step (CPU time {r['cpu_overhead_us_per_step']:+.1f}), "
                           f"{r['time_ratio']:.3f}x", None) for r in rows if r["loop"] != r["baseline"]]
    headers = ["recipe", "vs", "batches", "opt steps", "repeats", "µs/batch", "IQR µs", "µs/opt step",
               "Δ µs/batch", "time ÷ baseline", "Δ CPU µs/batch", "note"]
    table = markdown_table(headers, [[r["loop"], "" if r["loop"] == r["baseline"] else r["baseline"], r["steps"],
                                      r["opt_steps"], r["repeats"], r["us_per_step"], r["us_per_step_iqr"],
                                      r["us_per_opt_step"], r["overhead_us_per_step"], r["time_ratio"],
                                      r["cpu_overhead_us_per_step"], r["note"]] for r in rows])
    notes = [f"The native Learner on the tiny workload (Linear 784->10, batch {WORKLOADS['tiny'][2]}), one fit of one "
             f"epoch per repeat: {steps} training batches and a {min(VALID_BATCHES, steps)}-batch validation pass, "
             "timed from the training pass's before_epoch to the validation pass's after_epoch, per training batch. "
             "One warm-up fit per recipe, then interleaved repeats (rotating order); medians.",
             "Δ µs/batch = median over repeats of (recipe - baseline) µs/batch in the same repeat; time ÷ baseline = "
             "median of the per-repeat ratios recipe / baseline (time, not throughput). A batch is one optimizer step "
             "except under GradAccumS(2) (and a step the fp16 scaler skips); µs/opt step divides by the steps applied.",
             f"MixedPrecisionS(fp16): {FP16_SYNC}; the other recipes add no per-step host sync (GradClipS's "
             "clip_grad_norm_ stays on the device; MetricsS reads its values once per epoch)."]
    report(args, "throughput_recipes", rows, env, table, notes, targets, chart=dict(
        panels={f"tiny (batch {WORKLOADS['tiny'][2]}): recipes": {r["loop"]: r["us_per_step"] for r in rows}},
        xlabel="µs/batch (lower is better)",
        title=f"nntrain recipes, {env['device_name']}, {env['date'][:10]}"))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; print and write the results. Returns the rows."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--recipes", action="store_true",
                        help="instead of the loops, time the native Learner on the tiny workload alone and with each "
                             "recipe subscriber (RECIPES), side by side; writes throughput_recipes.* (about 2 min on "
                             "2 CPU cores; with --quick, seconds)")
    args = parser.parse_args(argv)
    device = setup_device(args.device, args.threads)
    env = env_info(device)
    print(f"device {env['device_name']} ({device.type}), torch {env['torch']}, lightning {env['lightning']}, "
          f"torch.set_num_threads({env['threads']}), interleaved repeats, medians reported", flush=True)
    if args.recipes:
        return report_recipes(args, device, env)

    rows = []
    with quiet_lightning():
        for wname, (make_model, shape, bs, steps, repeats) in WORKLOADS.items():
            if args.quick:
                steps, repeats = QUICK_STEPS, 1
            rows += run_workload(wname, make_model, shape, bs, steps, args.repeats or repeats, device)
        if not args.quick:  # compiling takes tens of seconds: not in the CI run
            rows += run_fast_path(WORKLOADS["mlp"][3], args.repeats or 11, device)

    by = {(r["workload"], r["loop"]): r for r in rows}
    on_cpu = device.type == "cpu"

    def over(loop: str, base: str) -> tuple[float, str]:
        key = "overhead_us_per_step" if base == "raw" else "over_lightning_us_per_step"
        wall, cpu = by["tiny", loop][key], by["tiny", loop]["cpu_" + key]
        return wall, f"{wall:+.1f} us/step (CPU time {cpu:+.1f})"

    native, native_text = over("learner+metrics", "raw")
    bridge, bridge_text = over("bridge", "lightning")
    gpu_ratio = by["mlp", "learner+metrics"]["ratio_to_raw"]
    targets = [
        target_line("CPU tiny: learner+metrics over raw", "<= +10 us/step", native_text, native <= 10 if on_cpu else None),
        target_line("CPU tiny: bridge over plain Lightning", "<= +30 us/step", bridge_text,
                    bridge <= 30 if on_cpu else None),
        target_line("CPU tiny: bridge+metrics over plain Lightning", "(reported)", over("bridge+metrics", "lightning")[1],
                    None),
        target_line("CPU tiny: bare learner over raw", "(reported)", over("learner", "raw")[1], None),
        target_line("GPU mlp: learner+metrics samples/s vs raw", ">= 0.95x", f"{gpu_ratio:.3f}x",
                    gpu_ratio >= 0.95 if device.type == "cuda" else None),
    ]
    if ("mlp-fastpath", "fast") in by:
        fast_ratio = by["mlp-fastpath", "fast"]["ratio_to_raw"]
        targets.append(target_line("GPU mlp: fast path (device data, CUDA graphs) samples/s vs raw eager", ">= 3x (H100)",
                                   f"{fast_ratio:.2f}x", fast_ratio >= 3 if device.type == "cuda" else None))
    else:
        targets.append(target_line("GPU mlp: fast path samples/s vs raw eager", ">= 3x (H100)",
                                   "not run with --quick", None))
    headers = ["workload", "loop", "batch", "steps", "repeats", "samples/s", "µs/step", "IQR µs", "× raw",
               "overhead µs/step", "vs Lightning µs/step", "CPU-time overhead µs/step"]
    table = markdown_table(headers, [[r["workload"], r["loop"], r["batch_size"], r["steps"], r["repeats"],
                                      r["samples_per_s"], r["us_per_step"], r["us_per_step_iqr"], r["ratio_to_raw"],
                                      r["overhead_us_per_step"], r["over_lightning_us_per_step"],
                                      r["cpu_overhead_us_per_step"]] for r in rows])
    notes = ["Interleaved repeats (rotating order) after one warm-up epoch per loop; medians. Timed: one training "
             "epoch, set-up and validation excluded (Lightning: on_train_epoch_start to on_train_epoch_end).",
             "overhead = median over repeats of (loop - raw) µs/step in the same repeat; the bridge targets use "
             "(bridge - lightning) the same way. IQR: interquartile range of µs/step over repeats. CPU time: the "
             "same from time.process_time, which leaves out time spent waiting for a core on a shared machine "
             "(targets are judged on wall-clock time)."]
    report(args, "throughput", rows, env, table, notes, targets, chart=dict(
        panels={f"{w} (batch {WORKLOADS[w][2]})": {r["loop"]: r["us_per_step"] for r in rows if r["workload"] == w}
                for w in WORKLOADS},
        xlabel="µs/step (lower is better)", title=f"nntrain throughput, {env['device_name']}, {env['date'][:10]}"))
    return rows


if __name__ == "__main__":
    main()
