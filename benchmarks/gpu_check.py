"""The prepared GPU check: every GPU claim of nntrain measured in one short run, into one folder.

    benchmarks/gpu_check.sh [OUT_DIR]          # on the GPU machine: --device cuda, 8-minute timeout, OUT_DIR.tar.gz
    python -m benchmarks.gpu_check [--device cuda|cpu] [--quick] [--out DIR] [--wheels DIR] [--budget S]

Stages, in this order, each recorded on its own (a failing stage writes `<stage>.traceback.txt`
and the others still run; the exit status is 1 when any stage failed or did not run):

- deps: installs the packages the check imports that are missing, from wheels brought along
  (nothing when none is missing), and makes `nntrain` importable from the working tree.
- env: `env.txt` with `nvidia-smi`, the Python and library versions and the device name.
- nosync: a Learner on device-resident data (seed MLP, batch 64) with MetricsS (a torcheval and
  a torchmetrics metric), ProgressS, TensorBoardS, NanGuardS(check_every=1000), a CheckpointS
  that never saves, and DeviceS. After a warm-up epoch, one epoch under
  `torch.cuda.set_sync_debug_mode("warn")` counts the host syncs of each training batch (and
  where they come from), from the end of the training pass's `before_epoch` to the start of its
  `after_epoch` (the loader's fetches included; epoch-end syncs, such as computing the metrics
  and writing TensorBoard, are allowed); then one epoch under mode "error" from the first
  `before_batch` to the last `after_batch` of each training batch records whether it raised,
  and the exception. "n/a on cpu" on the CPU, where the epochs still run.
- throughput, data: `python -m benchmarks.throughput` (with its fast-path rows, seed MLP at
  batch 1024) and `python -m benchmarks.data`, in process, writing their JSON lines, tables and
  charts into the folder.
- cuda_tests: pytest on the tests that need CUDA (`-k cuda` over the test files that ask
  `torch.cuda.is_available()`), in a child process, output in `cuda_tests.log`.
- fastpath: benchmarks.throughput's fast-path comparison (CompiledLearner + DeviceDataLoader vs
  the raw eager loop) at batch 64, where kernel launches dominate, into `fastpath.jsonl`; then a
  short CompiledLearner fit with MetricsS against the same plain-Learner fit (same rows expected).

`summary.md` and `summary.json` (rewritten after every stage, so a killed run still leaves one)
hold the stages and the targets as `target / measured / met`: fast path >= 3x the raw eager loop's
samples/s (seed MLP), learner + MetricsS >= 0.95x raw, the bridge no slower per step than plain
Lightning, and zero host syncs per training batch. The summary is printed at the end.

The GPU machine lacks torcheval and datasets (and datasets' dill and multiprocess), and nntrain
is not installed there. Prepare the wheels on a dev machine, in the repo root (`.whl/` is
gitignored; for another Python, change `--python-version`):

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        torcheval==0.0.7 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

(about 1 MB). datasets 5.2 also needs pyarrow>=24, pandas, xxhash, fsspec<=2026.9.0,
huggingface-hub>=1.31, requests, pyyaml, filelock, tqdm: add any of those the machine lacks.
`--wheels DIR` (default: `.whl`, else `wheels`, in the repo root) is installed with
`pip install --no-index --no-deps --target <tmp>`, only the wheels whose distribution is missing,
and the target is put on the path of this process and of the pytest one. `import nntrain`
imports datasets (`nntrain.data` does), so when datasets still cannot be imported a stand-in
module is put in its place: the stages that do not load data run, and the data stage fails
saying why. Without an install, `nntrain.adapters` (the top-level folder `adapters/`) is found
by adding the repo root to `nntrain.__path__`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import DEFAULT_OUT as RESULTS
from benchmarks.common import env_info, markdown_table, target_line, write_outputs

__all__ = ["Stage", "SyncLog", "prepare_imports", "run_deps", "nosync_check", "fast_path_rows", "run_cuda_tests",
           "targets", "main"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = RESULTS / "gpu_check"
BUDGET_S = 450  # the whole check; gpu_check.sh kills it at 480 s
NEEDED = {"torcheval": "torcheval", "datasets": "datasets", "torchmetrics": "torchmetrics", "lightning": "lightning",
          "tensorboard": "tensorboard", "matplotlib": "matplotlib", "sklearn": "scikit-learn", "pytest": "pytest"}
"""Modules the check imports, with their distributions."""
VERSIONS = ("lightning", "torchmetrics", "torcheval", "datasets", "tensorboard", "numpy", "pyarrow",
            "fsspec", "huggingface-hub", "scikit-learn", "pytest")
NOSYNC = {"batches": 2048, "batch_size": 64, "valid_batches": 16, "flush_every": 256, "check_every": 1000}
"""The no-sync epoch: long enough (about a second on a GPU) for ProgressS's 0.25 s refreshes, MetricsS's
flushes (every 256 batches, its default) and NanGuardS's reads (every 1000) to happen inside it."""
NOSYNC_QUICK = {"batches": 12, "batch_size": 64, "valid_batches": 2, "flush_every": 4, "check_every": 5}
THROUGHPUT_REPEATS = 15  # the full run's per-workload repeats (up to 51) would take minutes more on a GPU
FAST_BATCH, FAST_STEPS, FAST_REPEATS = 64, 500, 11
CAPS_S = {"deps": 120, "env": 30, "nosync": 90, "throughput": 240, "cuda_tests": 150, "fastpath": 150, "data": 120}
"""Each stage's own time limit, in seconds; the whole check's budget cuts them further."""


class StageTimeout(Exception):
    """A stage ran past its time limit (raised from SIGALRM). An Exception, so Lightning re-raises it."""


class Terminated(Exception):
    """SIGTERM arrived (gpu_check.sh's timeout): the stage in flight is recorded and the summary written."""


@dataclass
class Stage:
    """One stage's record: status "ok", "failed" or "not run", seconds, a one-line error, its result."""

    name: str
    status: str = "not run"
    seconds: float = 0.0
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)


# ----- imports on a machine without nntrain installed --------------------------------------------------------


def _dist_of(wheel: Path) -> str:
    """The normalised distribution name of a wheel file (`datasets-5.2.0-py3-none-any.whl` -> `datasets`)."""
    return wheel.name.split("-")[0].lower().replace("_", "-")


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _stub_datasets(reason: str) -> None:
    """Put a stand-in `datasets` module in `sys.modules`: `import nntrain` works, any use fails with `reason`."""
    for name in [n for n in sys.modules if n == "datasets" or n.startswith("datasets.")]:
        del sys.modules[name]  # a half-imported package
    stub = types.ModuleType("datasets", f"stand-in put by benchmarks.gpu_check: {reason}")
    stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

    def __getattr__(name: str) -> Any:  # AttributeError, as `hasattr` and `inspect` expect
        raise AttributeError(f"datasets is not usable here ({reason}); datasets.{name} was asked for")

    stub.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules["datasets"] = stub


def prepare_imports(wheels: Path | None) -> dict[str, Any]:
    """Install the missing `NEEDED` packages from `wheels`, then make `nntrain` and `nntrain.adapters` importable.

    Args:
        wheels: a folder of wheels, or None not to install (the pytest process: its parent did).

    Returns:
        What was missing, installed and patched, for env.txt.
    """
    report: dict[str, Any] = {"missing": [m for m in NEEDED if importlib.util.find_spec(m) is None], "installed": []}
    if report["missing"] and wheels is not None:
        todo = [w for w in sorted(wheels.glob("*.whl")) if not _installed(_dist_of(w))] if wheels.is_dir() else []
        report["wheels"] = str(wheels) if wheels.is_dir() else f"{wheels} (no such folder)"
        if todo:
            site = Path(tempfile.mkdtemp(prefix="nntrain_gpu_check_site_"))
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, todo)]
            pip = subprocess.run(cmd, capture_output=True, text=True)
            print(pip.stdout + pip.stderr)
            if pip.returncode != 0:
                report["install_error"] = (pip.stderr.strip() or f"pip exited with {pip.returncode}").splitlines()[-1]
            else:
                sys.path.append(str(site))
                os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(site)]))
                importlib.invalidate_caches()
                report["installed"], report["site"] = [w.name for w in todo], str(site)
    try:
        import datasets  # noqa: F401  (nntrain.data imports it)
    except Exception as e:  # missing, or a dependency too old (pyarrow): keep the rest of the check running
        _stub_datasets(f"{type(e).__name__}: {e}")
        report["datasets_stub"] = f"{type(e).__name__}: {e}"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import nntrain

    if importlib.util.find_spec("nntrain.adapters") is None:  # not pip-installed: adapters/ is nntrain.adapters
        nntrain.__path__.append(str(ROOT))
        report["adapters_path_fix"] = True
    report["still_missing"] = [NEEDED[m] for m in NEEDED if importlib.util.find_spec(m) is None]  # distributions
    report["nntrain"] = str(Path(nntrain.__file__).parent)
    return report


def run_deps(wheels: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The deps stage: `prepare_imports(wheels)` into `report` (kept for env.txt even when the stage fails).

    Raises:
        RuntimeError: a needed module is still missing, pip failed, or datasets had to be stubbed.
    """
    report.update(prepare_imports(wheels))
    problems = [f"{k}: {report[k]}" for k in ("still_missing", "install_error", "datasets_stub") if report.get(k)]
    if problems:
        raise RuntimeError("; ".join(problems))
    return report


# ----- the no-sync check -------------------------------------------------------------------------------------


def _short(filename: str) -> str:
    """`filename` relative to the repo, or from its package folder on for an installed library."""
    path = Path(filename)
    if path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    return filename.split("site-packages/")[-1]


class SyncLog:
    """Host-device syncs in training passes, by training batch, seen through `set_sync_debug_mode("warn")`:
    each sync is a warning whose place is the Python line that made it. Without CUDA it counts batches only."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.active = cuda, False
        self.per_batch: list[int] = []  # syncs from a batch's before_batch up to the next one's
        self.before_first = 0  # syncs between the opening and the first before_batch
        self.where: Counter[str] = Counter()
        self.first_stack = ""
        self._catch: Any = None
        self._show: Any = None

    def open(self) -> None:
        """Start counting: sync debug mode "warn", sync warnings routed to `_seen`."""
        if self.active:
            return
        self.active = True
        if self.cuda:
            self._catch = warnings.catch_warnings()  # restores filters and showwarning on close
            self._catch.__enter__()
            warnings.filterwarnings("always", message=".*synchroniz")
            self._show, warnings.showwarning = warnings.showwarning, self._seen
            torch.cuda.set_sync_debug_mode("warn")

    def mark_batch(self) -> None:
        """A training batch starts."""
        if self.active:
            self.per_batch.append(0)

    def close(self) -> None:
        """Stop counting."""
        if self.active:
            self.active = False
            if self.cuda:
                torch.cuda.set_sync_debug_mode("default")
                self._catch.__exit__(None, None, None)

    def _seen(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
              line: Any = None) -> None:
        if "synchroniz" not in str(message):
            self._show(message, category, filename, lineno, file, line)
            return
        if self.per_batch:
            self.per_batch[-1] += 1
        else:
            self.before_first += 1
        self.where[f"{_short(filename)}:{lineno}"] += 1
        if not self.first_stack:
            self.first_stack = "".join(traceback.format_stack()[:-1])


class _OpenSyncLog:
    """Opens the log after every other subscriber's `before_epoch` of a training pass."""

    order = 10_000

    def __init__(self, log: SyncLog) -> None:
        self.log = log

    def before_epoch(self, learn: Any) -> None:
        if learn.model.training:
            self.log.open()


class _MarkSyncLog:
    """Marks each batch; closes the log before any other subscriber's `after_epoch` (epoch-end syncs are allowed)."""

    order = -10_000

    def __init__(self, log: SyncLog) -> None:
        self.log = log

    def before_batch(self, learn: Any) -> None:
        self.log.mark_batch()

    def after_epoch(self, learn: Any) -> None:
        self.log.close()

    def cleanup_epoch(self, learn: Any) -> None:
        self.log.close()


class _SyncErrorOn:
    """Mode "error" before any other subscriber's `before_batch` of a training batch; "default" first
    thing at `cleanup_batch`, so that after a raise the other subscribers' cleanups may sync."""

    order = -10_000

    def before_batch(self, learn: Any) -> None:
        if learn.model.training:
            torch.cuda.set_sync_debug_mode("error")

    def cleanup_batch(self, learn: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")


class _SyncErrorOff:
    """Mode "default" after every other subscriber's `after_batch`."""

    order = 10_000

    def after_batch(self, learn: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")


def nosync_check(device: torch.device, quick: bool, out: Path) -> dict[str, Any]:
    """Warm-up epoch, counting epoch (mode "warn"), raising epoch (mode "error") of a Learner with
    every per-batch subscriber on device-resident data; the result also goes to `nosync.json`."""
    from torcheval.metrics import MulticlassAccuracy
    from torchmetrics.classification import MulticlassF1Score

    from benchmarks.throughput import seed_mlp
    from nntrain import CheckpointS, DataLoaders, DeviceS, Learner, MetricsS, NanGuardS, ProgressS, TensorBoardS
    from nntrain.fastpath import DeviceDataLoader

    cfg = NOSYNC_QUICK if quick else NOSYNC
    bs, cut = cfg["batch_size"], cfg["batches"] * cfg["batch_size"]
    g = torch.Generator().manual_seed(0)
    n = cut + cfg["valid_batches"] * bs
    x, y = torch.randn(n, 784, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)
    dls = DataLoaders(DeviceDataLoader(x[:cut], y[:cut], bs, drop_last=True),
                      DeviceDataLoader(x[cut:], y[cut:], bs, shuffle=False))
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_nosync_"))
    metrics = MetricsS(accuracy=MulticlassAccuracy(), f1=MulticlassF1Score(num_classes=10),
                       flush_every=cfg["flush_every"])
    subs = [DeviceS(device), metrics, ProgressS(), TensorBoardS(tmp / "tb"), NanGuardS(check_every=cfg["check_every"]),
            CheckpointS(tmp / "ckpt", every_epochs=None, every_batches=None)]
    learn = Learner(seed_mlp(), dls, F.cross_entropy, torch.optim.SGD, 0.1, subs=subs)
    cuda, log, error = device.type == "cuda", SyncLog(device.type == "cuda"), ""
    try:
        learn.fit(1)  # warm-up: metric states moved to the device, allocator and kernels ready
        learn.fit(1, subs=[_OpenSyncLog(log), _MarkSyncLog(log)])
        try:
            learn.fit(1, subs=[_SyncErrorOn(), _SyncErrorOff()] if cuda else [])
        except Exception as e:
            error = "".join(traceback.format_exception(e))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    syncs = sum(log.per_batch)
    na = {"result": "n/a on cpu"}
    result = {
        "device": device.type, "epochs_ran": 3, "train_batches": len(log.per_batch), "config": cfg,
        "verdict": "n/a on cpu" if not cuda else ("pass" if syncs == 0 and not error else "fail"),
        "last_rows": [dict(r) for r in metrics.history[-2:]],
        "warn": {"syncs_in_batches": syncs, "syncs_per_batch": syncs / max(1, len(log.per_batch)),
                 "batches_with_syncs": sum(1 for c in log.per_batch if c), "before_first_batch": log.before_first,
                 "where": dict(log.where.most_common()), "first_stack": log.first_stack} if cuda else na,
        "error_mode": {"passed": not error, "exception": error} if cuda else na,
    }
    if error and not cuda:
        raise RuntimeError(f"the third epoch failed on the CPU:\n{error}")
    (out / "nosync.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


# ----- stages ------------------------------------------------------------------------------------------------


def write_env(out: Path, device: torch.device, deps: dict[str, Any]) -> dict[str, Any]:
    """Write `env.txt` (nvidia-smi, versions, device) and return the versions."""
    info = env_info(device)
    versions = {d: (importlib.metadata.version(d) if _installed(d) else "not installed") for d in VERSIONS}
    lines = [f"date: {info['date']}", f"python: {platform.python_version()} ({sys.executable})",
             f"platform: {platform.platform()}", f"device: {device.type}, {info['device_name']}",
             f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"cuda device: {props.name}, capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    lines += [f"{d}: {v}" for d, v in versions.items()]
    lines += [f"deps.{k}: {v}" for k, v in deps.items()]
    smi = shutil.which("nvidia-smi")
    if smi:
        run = subprocess.run([smi], capture_output=True, text=True, timeout=20)
        lines += ["", "$ nvidia-smi", run.stdout + run.stderr]
    else:
        lines += ["", "nvidia-smi: not found"]
    (out / "env.txt").write_text("\n".join(lines) + "\n")
    return {"device_name": info["device_name"], "torch": torch.__version__, **versions}


def fast_path_rows(batch_size: int, steps: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """`benchmarks.throughput.run_fast_path` at `batch_size` (it reads the seed MLP's batch size from
    `WORKLOADS["mlp"]`, which is swapped for the call); rows relabelled `mlp-fastpath-b<batch_size>`."""
    from benchmarks import throughput

    saved = throughput.WORKLOADS["mlp"]
    throughput.WORKLOADS["mlp"] = (saved[0], saved[1], batch_size, steps, repeats)
    try:
        rows = throughput.run_fast_path(steps, repeats, device)
    finally:
        throughput.WORKLOADS["mlp"] = saved
    return [{**row, "workload": f"mlp-fastpath-b{batch_size}"} for row in rows]


def fast_path_with_metrics(device: torch.device) -> dict[str, Any]:
    """A short fit of CompiledLearner with MetricsS (which keeps every batch's loss and predictions until
    it flushes; CUDA graphs reuse their outputs' memory) against the same fit of a plain Learner."""
    from torcheval.metrics import MulticlassAccuracy

    from benchmarks.throughput import seed_mlp
    from nntrain import DataLoaders, Learner, MetricsS
    from nntrain.fastpath import CompiledLearner, DeviceDataLoader

    g = torch.Generator().manual_seed(0)
    n = 20 * FAST_BATCH
    x, y = torch.randn(n, 784, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)
    histories = {}
    try:
        for name, make in (("eager", Learner), ("compiled", CompiledLearner)):
            torch.manual_seed(0)
            dl = DeviceDataLoader(x, y, FAST_BATCH, shuffle=False, drop_last=True)
            metrics = MetricsS(accuracy=MulticlassAccuracy(), flush_every=8)
            metrics.sink = lambda row: None
            make(seed_mlp().to(device), DataLoaders(dl, dl), F.cross_entropy, torch.optim.SGD, 0.1,
                 subs=[metrics]).fit(2)
            histories[name] = metrics.history
    except Exception as e:
        return {"ok": False, "error": "".join(traceback.format_exception(e))}
    pairs = zip(histories["eager"], histories["compiled"])
    diff = max(abs(a[k] - b[k]) for a, b in pairs for k in ("loss", "accuracy"))
    return {"ok": diff <= 1e-4, "max_diff": diff, "error": "" if diff <= 1e-4 else f"rows differ by {diff:.2e}"}


def run_fastpath(out: Path, device: torch.device, quick: bool) -> dict[str, Any]:
    """The fast path vs raw eager at batch 64 into `fastpath.jsonl`/`.md`, then `fast_path_with_metrics`.
    With --quick on the CPU, torch.compile is off (inductor's C++ build takes a minute there): plumbing only."""
    steps, repeats = (3, 1) if quick else (FAST_STEPS, FAST_REPEATS)
    no_compile = quick and device.type == "cpu"
    with torch._dynamo.config.patch(disable=True) if no_compile else contextlib.nullcontext():
        rows = fast_path_rows(FAST_BATCH, steps, repeats, device)
        with_metrics = fast_path_with_metrics(device)
    table = markdown_table(["workload", "loop", "batch", "steps", "repeats", "samples/s", "µs/step", "× raw"],
                           [[r["workload"], r["loop"], r["batch_size"], r["steps"], r["repeats"], r["samples_per_s"],
                             r["us_per_step"], r["ratio_to_raw"]] for r in rows])
    notes = ["benchmarks.throughput.run_fast_path at a launch-bound batch: seed MLP, data on the device, "
             "CompiledLearner (reduce-overhead: CUDA graphs on CUDA) vs the raw eager loop, interleaved, medians."]
    if no_compile:
        notes.append("--quick on the CPU: torch.compile disabled, numbers meaningless.")
    write_outputs(out, "fastpath", rows, env_info(device), table, notes)
    return {"ratio_to_raw": next(r["ratio_to_raw"] for r in rows if r["loop"] == "fast"), "compiled": not no_compile,
            "with_metrics": with_metrics}


def run_benchmark(name: str, out: Path, device: torch.device, quick: bool) -> dict[str, Any]:
    """`python -m benchmarks.<name>` in this process, its outputs into `out`."""
    module = importlib.import_module(f"benchmarks.{name}")
    argv = ["--device", device.type, "--out", str(out)]
    if quick:
        argv.append("--quick")
    elif name == "throughput":
        argv += ["--repeats", str(THROUGHPUT_REPEATS)]
    stub = sys.modules.get("datasets")
    if name == "data" and stub is not None and getattr(stub, "__file__", None) is None:
        raise RuntimeError(f"datasets is not usable here: {stub.__doc__}")
    rows = module.main(argv)
    return {"rows": len(rows), "argv": " ".join(argv)}


def run_cuda_tests(out: Path, timeout: float) -> dict[str, Any]:
    """pytest `-k cuda` over the test files that ask `torch.cuda.is_available()`, in a child process with
    the same import fixes, output in `cuda_tests.log`.

    Raises:
        RuntimeError: pytest failed (a test failed or errored), naming its summary line.
    """
    files = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("test_*.py"))
             if "cuda.is_available" in p.read_text()]
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--pytest", "-q", "-rA", "-k", "cuda",
           "-p", "no:cacheprovider", *files]
    log = out / "cuda_tests.log"
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    last = next((ln.strip("= ") for ln in reversed(log.read_text().splitlines())
                 if " in " in ln and any(w in ln for w in ("passed", "skipped", "failed", "error"))), "")
    if rc != 0:
        raise RuntimeError(f"pytest exited with {rc}: {last or 'see cuda_tests.log'}")
    return {"files": files, "result": last}


# ----- the summary -------------------------------------------------------------------------------------------


def _rows(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["workload"], r["loop"]): r for r in rows}


def targets(out: Path, nosync: Stage, device: torch.device) -> list[dict[str, Any]]:
    """The four targets as dicts (name, target, measured, met, line), read from the stages' outputs.
    `met` is None where a figure is missing or the device is not CUDA (the targets are GPU targets)."""
    tp, fp = _rows(out / "throughput.jsonl"), _rows(out / "fastpath.jsonl")
    gpu = device.type == "cuda"
    found: list[tuple[str, str, str, bool | None]] = []

    fast = tp.get(("mlp-fastpath", "fast"))
    small = fp.get((f"mlp-fastpath-b{FAST_BATCH}", "fast"))
    big = f"{fast['ratio_to_raw']:.2f}x at batch {fast['batch_size']}" if fast else "batch 1024 not run"
    measured = big + (f", {small['ratio_to_raw']:.2f}x at batch {FAST_BATCH}" if small
                      else f", batch {FAST_BATCH} not run")
    found.append(("fast path (CompiledLearner + DeviceDataLoader) samples/s vs raw eager, seed MLP", ">= 3x",
                  measured, fast["ratio_to_raw"] >= 3 if gpu and fast else None))

    metrics = tp.get(("mlp", "learner+metrics"))
    found.append(("learner + MetricsS samples/s vs raw, seed MLP batch 1024", ">= 0.95x",
                  f"{metrics['ratio_to_raw']:.3f}x" if metrics else "not run",
                  metrics["ratio_to_raw"] >= 0.95 if gpu and metrics else None))

    bridge, plain = tp.get(("tiny", "bridge")), tp.get(("tiny", "lightning"))
    found.append(("bridge vs plain Lightning per step, tiny Linear batch 64", "<= +0 us/step",
                  f"{bridge['over_lightning_us_per_step']:+.1f} us/step ({bridge['us_per_step']:.0f} vs "
                  f"{plain['us_per_step']:.0f} us/step)" if bridge and plain else "not run",
                  bridge["over_lightning_us_per_step"] <= 0 if gpu and bridge and plain else None))

    sync = nosync.result
    if not sync:
        measured, met = "not run", None
    elif not gpu:
        measured, met = f"n/a on cpu (epochs ran: {sync['epochs_ran']}, {sync['train_batches']} training batches)", None
    else:
        warn, err = sync["warn"], sync["error_mode"]
        measured = (f"{warn['syncs_in_batches']} in {sync['train_batches']} training batches "
                    f"({warn['syncs_per_batch']:.4f}/batch); mode 'error': {'passed' if err['passed'] else 'raised'}")
        met = warn["syncs_in_batches"] == 0 and err["passed"]
    found.append(("host syncs per training batch (Learner + MetricsS, ProgressS, TensorBoardS, NanGuardS, "
                  "CheckpointS, DeviceS)", "0", measured, met))
    return [dict(name=n, target=t, measured=m, met=ok, line=target_line(n, t, m, ok)) for n, t, m, ok in found]


def write_summary(out: Path, stages: list[Stage], device: torch.device, quick: bool) -> str:
    """Write summary.md and summary.json from the stages so far; return the Markdown."""
    by = {s.name: s for s in stages}
    tgs = targets(out, by["nosync"], device)
    ok = all(s.status == "ok" for s in stages)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("summary."))
    md = [f"# nntrain GPU check: {by['env'].result.get('device_name', device.type)} ({device.type})"
          f"{', --quick (numbers meaningless)' if quick else ''}", "",
          markdown_table(["stage", "status", "seconds", "error"],
                         [[s.name, s.status, round(s.seconds, 1), s.error[:160]] for s in stages]), "",
          "Targets (target / measured / met):", "", "```", *[t["line"] for t in tgs], "```", ""]
    fast = by["fastpath"].result.get("with_metrics")
    if fast:
        md += [f"Fast path with MetricsS (2 epochs, CompiledLearner vs Learner): "
               f"{'same rows' if fast['ok'] else 'FAILED'}" + (f" (max difference {fast['max_diff']:.1e})"
                                                              if "max_diff" in fast else ""), ""]
        if fast["error"]:
            md += ["```", fast["error"].strip()[-3000:], "```", ""]
    sync = by["nosync"].result
    if sync.get("warn", {}).get("where"):
        md += ["Host syncs in training batches, by place (mode 'warn'):", "",
               *[f"- `{w}`: {n}" for w, n in sync["warn"]["where"].items()], ""]
    if sync.get("error_mode", {}).get("exception"):
        md += ["Mode 'error' raised:", "", "```", sync["error_mode"]["exception"].strip()[-3000:], "```", ""]
    md += [f"Files: {', '.join(files)}", ""]
    text = "\n".join(md)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        {"device": device.type, "quick": quick, "ok": ok, "targets": tgs,
         "stages": [vars(s) for s in stages]}, indent=2, default=str) + "\n")
    return text


# ----- running the stages ------------------------------------------------------------------------------------


def _raise(exc: type[Exception], what: str) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        raise exc(what)
    return handler


def run_stage(stage: Stage, body: Callable[[], dict[str, Any]], out: Path, seconds: float) -> None:
    """Run `body` with its output in `<name>.log` and a SIGALRM limit of `seconds`; record it in `stage`."""
    print(f"[gpu_check] {stage.name} (limit {seconds:.0f} s) ...", flush=True)
    t0 = time.perf_counter()
    with (out / f"{stage.name}.log").open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            stage.result = body() or {}
            stage.status = "ok"
        except (Exception, SystemExit) as e:  # SystemExit: a benchmark's argument check
            stage.status = "failed"
            stage.error = f"{type(e).__name__}: {e}".splitlines()[0]
            (out / f"{stage.name}.traceback.txt").write_text("".join(traceback.format_exception(e)))
            if isinstance(e, Terminated):
                raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            stage.seconds = time.perf_counter() - t0
    print(f"[gpu_check] {stage.name}: {stage.status} in {stage.seconds:.1f} s {stage.error}", flush=True)


def _pytest_main(args: list[str]) -> int:
    """The child process of the cuda_tests stage: the same import fixes, then pytest."""
    prepare_imports(None)
    import pytest

    return pytest.main(args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds: the CPU dry run of the test suite")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--wheels", type=Path, default=None, help="wheels of missing packages (default .whl or wheels)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole check (default {BUDGET_S})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every stage, write the folder, print the summary. Returns the exit status (0: every stage ok)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pytest"]:
        return _pytest_main(argv[1:])
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda asked for, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    wheels = args.wheels or next((ROOT / d for d in (".whl", "wheels") if (ROOT / d).is_dir()), ROOT / ".whl")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    stages = [Stage(n) for n in ("deps", "env", "nosync", "throughput", "cuda_tests", "fastpath", "data")]
    deps: dict[str, Any] = {}
    bodies: dict[str, Callable[[], dict[str, Any]]] = {
        "deps": lambda: run_deps(wheels, deps),
        "env": lambda: write_env(out, device, deps),
        "nosync": lambda: nosync_check(device, args.quick, out),
        "throughput": lambda: run_benchmark("throughput", out, device, args.quick),
        "cuda_tests": lambda: run_cuda_tests(out, max(1.0, deadline - time.perf_counter())),
        "fastpath": lambda: run_fastpath(out, device, args.quick),
        "data": lambda: run_benchmark("data", out, device, args.quick),
    }
    old = {s: signal.signal(s, _raise(e, w)) for s, e, w in ((signal.SIGALRM, StageTimeout, "stage time limit"),
                                                          (signal.SIGTERM, Terminated, "SIGTERM"))}
    threads = torch.get_num_threads()
    try:
        for stage in stages:
            left = deadline - time.perf_counter()
            if left < 10:
                stage.error = "time budget spent"
            else:
                run_stage(stage, bodies[stage.name], out, min(CAPS_S[stage.name], left))
            write_summary(out, stages, device, args.quick)
    except Terminated:
        print("[gpu_check] terminated (SIGTERM): summary of the stages so far", flush=True)
        for stage in stages:
            stage.error = stage.error or ("terminated" if stage.status == "not run" else "")
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        torch.set_num_threads(threads)
    print(write_summary(out, stages, device, args.quick), flush=True)
    return 0 if all(s.status == "ok" for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
