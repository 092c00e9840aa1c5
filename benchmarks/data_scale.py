"""Data at scale: nntrain's uint8 loaders (in memory, memory-mapped) against today's float32 path,
the Hugging Face idioms and in-memory numpy arrays, on generated sets of RGB PNG images.

    python -m benchmarks.data --part scale [--sizes 50000,200000] [--varied 10000] [--data-dir DIR]

Each set is a saved `DatasetDict` ("train": n images, "test": 10,000) of 32x32 RGB PNGs (smooth
noise, about CIFAR-10's PNG size), reloaded with `datasets.load_from_disk`; the varied set's
images are 24 to 64 pixels a side, loaded at 32x32 (`size=32`). Every measurement is a fresh
process: the time from `load_from_disk` to the first training batch, then the rest of that epoch
(batch 64, shuffled; images/s over it), and the process's peak RSS over its RSS after the
imports. Methods with a cache run twice: a first run that builds it, a second that finds it.

- nntrain-memory / nntrain-disk: `DataLoaders.from_hf_dd(in_memory=True / False)`: the uint8
  cache held in memory, or read from the cache file per batch.
- float32-today: the decode-everything-to-float32 path `from_hf_dd` had before (both splits,
  one process, every run).
- hf-with_transform: `ds.with_transform(to_tensors)` + a DataLoader with 2 workers.
- hf-map-uint8: `ds.map` into a uint8 `Array3D` column (cached by fingerprint) +
  `with_format("torch")` + a DataLoader.
- numpy-arrays: the images as one uint8 numpy array loaded from a `.npy` file, converted per
  item (torchvision's CIFAR10 style: `ToTensor` per image, default collate).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import env_info, markdown_table, report, setup_device, sync, target_line
from nntrain.data import DataLoaders, ResumableDataLoader, TensorPairDataset, pre_batched_collate

SIZES = (50_000, 200_000)
VALID = 10_000
VARIED = 10_000
QUICK = dict(sizes=(600,), valid=100, varied=200)
BATCH = 64
SIDE = 32
DEFAULT_DATA = Path(os.environ.get("TMPDIR", "/tmp")) / "nntrain-bench-data"
METHODS = ("nntrain-memory", "nntrain-disk", "float32-today", "hf-with_transform", "hf-map-uint8", "numpy-arrays")
CACHED = ("nntrain-memory", "nntrain-disk", "hf-map-uint8")
"""Methods whose first run builds a cache that the second finds."""
BOTH_SPLITS = ("float32-today",)
"""Methods that hold the validation split's images too before the first batch (nntrain decodes
them on a first run, but reads them only at the first validation pass)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This part's options on the data benchmark's parser."""
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="training set sizes, comma-separated")
    p.add_argument("--varied", type=int, default=VARIED, help="images in the varied-size set (0: none)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help=f"generated sets (default {DEFAULT_DATA})")


# ----- the generated sets -----------------------------------------------------------------------


def _pictures(args: tuple[int, int, bool]) -> tuple[list[bytes], list[np.ndarray]]:
    """`n` PNGs from seed `seed` (smooth noise; 24-64 pixels a side when varied) and their pixels."""
    n, seed, varied = args
    rng = np.random.default_rng(seed)
    blobs, arrays = [], []
    for _ in range(n):
        h, w = (int(rng.integers(24, 65)), int(rng.integers(24, 65))) if varied else (SIDE, SIDE)
        low = Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8))
        pixels = np.asarray(low.resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
        pixels = np.clip(pixels + rng.integers(-6, 7, pixels.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        blobs.append(buf.getvalue())
        arrays.append(pixels)
    return blobs, arrays


def make_set(root: Path, n: int, n_valid: int, varied: bool) -> Path:
    """The saved DatasetDict of `n` (+ `n_valid`) images under `root`, made once (a `done` file
    marks it whole); for one size, `train_x.npy`/`train_y.npy` beside it."""
    path = root / (f"varied-{n}" if varied else f"rgb32-{n}")
    if (path / "done").exists():
        return path
    from multiprocessing import Pool

    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    splits = {}
    for name, count, seed in (("train", n, 0), ("test", n_valid, 1)):
        chunks = [(min(5_000, count - i), seed * 1_000_000 + i, varied) for i in range(0, count, 5_000)]
        if len(chunks) > 1:
            with Pool(os.cpu_count() or 1) as pool:
                parts = pool.map(_pictures, chunks)
        else:
            parts = [_pictures(chunks[0])]
        blobs = [b for part, _ in parts for b in part]
        labels = (np.arange(count) % 10).tolist()
        splits[name] = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b in blobs], "label": labels}, features=features)
        if name == "train" and not varied:
            path.mkdir(parents=True, exist_ok=True)
            np.save(path / "train_x.npy", np.stack([a for _, arrays in parts for a in arrays]))
            np.save(path / "train_y.npy", np.asarray(labels, dtype=np.int64))
    datasets.DatasetDict(splits).save_to_disk(str(path))
    (path / "done").write_text(json.dumps({"n": n, "valid": n_valid, "varied": varied}))
    return path


def clear_caches(path: Path) -> None:
    """Delete what earlier runs cached beside the set (nntrain's arrays, `map`'s Arrow files)."""
    for pattern in ("nntrain-images-*", "cache-*.arrow"):
        for f in path.glob(f"*/{pattern}"):
            f.unlink()


# ----- one measurement (a child process) --------------------------------------------------------


def _status(field: str) -> int:
    """A size from /proc/self/status in bytes (`VmRSS`: resident now, `VmHWM`: the peak); off
    Linux, the peak from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> None:
    """Start the peak RSS (VmHWM) over from the RSS now (Linux: `5` to /proc/self/clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _old_float_tensors(ds: Any) -> TensorPairDataset:
    """The path `from_hf_dd` took before uint8: every image decoded in this process into a
    list, stacked, permuted and made one float32 tensor."""
    cells = ds.with_format("arrow")[:].column("image").to_pylist()
    arrays = [np.array(Image.open(io.BytesIO(c["bytes"]))) for c in cells]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError("refuses images of different sizes")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(ds.with_format("arrow")[:].column("label").to_numpy().astype(np.int64))
    return TensorPairDataset(images.to(torch.float32).div_(255), labels)


def _pil_to_tensor(img: Image.Image, varied: bool) -> torch.Tensor:
    img = img.convert("RGB")
    if varied:
        img = img.resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)


class _NumpyImages(Dataset):
    """torchvision's CIFAR10 style: uint8 HWC arrays in memory, one `ToTensor` per item."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.x[i]).permute(2, 0, 1).float().div(255), int(self.y[i])


def _loader(method: str, path: Path, varied: bool, device: torch.device) -> Any:
    """The training loader of `method` on the set at `path` (what every run builds before training)."""
    size = SIDE if varied else None
    on = device if device.type == "cuda" else None
    if method in ("nntrain-memory", "nntrain-disk"):
        dd = datasets.load_from_disk(str(path))
        return DataLoaders.from_hf_dd(dd, BATCH, flatten=False, size=size, in_memory=method == "nntrain-memory",
                                      device=on).train
    if method == "float32-today":
        dd = datasets.load_from_disk(str(path))
        train, _ = _old_float_tensors(dd["train"]), _old_float_tensors(dd["test"])
        return ResumableDataLoader(train, batch_size=BATCH, shuffle=True, collate_fn=pre_batched_collate)
    if method == "hf-with_transform":
        ds = datasets.load_from_disk(str(path))["train"]

        def to_tensors(batch: dict[str, list[Any]]) -> dict[str, Any]:
            return {"x": [_pil_to_tensor(img, varied) for img in batch["image"]], "y": batch["label"]}

        return DataLoader(ds.with_transform(to_tensors), batch_size=BATCH, shuffle=True, num_workers=2)
    if method == "hf-map-uint8":
        ds = datasets.load_from_disk(str(path))["train"]
        features = datasets.Features({"x": datasets.Array3D((3, SIDE, SIDE), "uint8"), "y": datasets.Value("int64")})

        def to_uint8(batch: dict[str, list[Any]]) -> dict[str, Any]:
            xs = [(_pil_to_tensor(img, varied) * 255).round().to(torch.uint8).numpy() for img in batch["image"]]
            return {"x": xs, "y": batch["label"]}

        mapped = ds.map(to_uint8, batched=True, features=features, remove_columns=["image", "label"])
        return DataLoader(mapped.with_format("torch"), batch_size=BATCH, shuffle=True)
    if method == "numpy-arrays":
        if varied:
            raise ValueError("needs images of one size")
        return DataLoader(_NumpyImages(np.load(path / "train_x.npy"), np.load(path / "train_y.npy")),
                          batch_size=BATCH, shuffle=True)
    raise ValueError(f"unknown method {method!r}")


def _xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    return batch[0], batch[1]


def measure(method: str, path: Path, varied: bool, device: torch.device) -> dict[str, Any]:
    """One run of `method`: seconds to the first batch, the rest of the epoch, peak RSS."""
    datasets.disable_progress_bars()
    torch.manual_seed(0)
    datasets.load_from_disk(str(path))  # its first call imports modules: not the data's memory
    _reset_peak()
    baseline = _status("VmRSS")
    t0 = time.perf_counter()
    try:
        batches = iter(_loader(method, path, varied, device))
    except ValueError as exc:
        return {"skipped": str(exc)}
    x, y = _xy(next(batches))
    x = x.to(device).float() / 255 if x.dtype == torch.uint8 else x.to(device)
    sync(device)
    first = time.perf_counter() - t0
    n, first_n, t1 = 0, len(y), time.perf_counter()
    for batch in batches:
        x, y = _xy(batch)
        x = x.to(device, non_blocking=True)
        if x.dtype == torch.uint8:  # hf-map-uint8 yields uint8: its floats are made here
            x = x.float().div_(255)
        n += len(y)
    sync(device)
    epoch = time.perf_counter() - t1
    peak = _status("VmHWM")  # not ru_maxrss: Linux carries that over from the parent across fork and exec
    return {"first_batch_s": first, "rest_s": epoch, "images_per_s": n / epoch if epoch else 0.0,
            "peak_rss_mb": max(peak - baseline, 0) / 2**20, "images": first_n + n}


def run_child(method: str, path: Path, varied: bool, device: torch.device, quick: bool) -> dict[str, Any]:
    """`measure` in a fresh process (in this one with `quick`: the figures then mean nothing)."""
    if quick:
        return measure(method, path, varied, device)
    spec = json.dumps({"method": method, "path": str(path), "varied": varied, "device": str(device),
                       "threads": torch.get_num_threads()})
    out = subprocess.run([sys.executable, "-m", "benchmarks.data_scale", "--child", spec], capture_output=True,
                         text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"{method} on {path.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----- the table ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Make the sets, measure every method on each, print and write the table. Returns the rows."""
    device = setup_device(args.device, args.threads)
    sizes = QUICK["sizes"] if args.quick else tuple(int(s) for s in str(args.sizes).split(",") if s)
    n_valid = QUICK["valid"] if args.quick else VALID
    n_varied = QUICK["varied"] if args.quick else args.varied
    root = args.out / "data-scale-sets" if args.quick else args.data_dir
    env = env_info(device)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sets = [(f"rgb32 {n // 1000}k" if n >= 1000 else f"rgb32 {n}", n, False) for n in sizes]
    if n_varied:
        sets.append((f"varied {n_varied // 1000}k" if n_varied >= 1000 else f"varied {n_varied}", n_varied, True))
    rows = []
    for label, n, varied in sets:
        t0 = time.perf_counter()
        path = make_set(root, n, n_valid, varied)
        print(f"[data scale] {label}: set ready in {time.perf_counter() - t0:.1f} s ({path})", flush=True)
        for method in METHODS:
            if method in CACHED:
                clear_caches(path)  # its first run builds the cache
            runs = [run_child(method, path, varied, device, args.quick)]
            if method in CACHED and "skipped" not in runs[0]:
                runs.append(run_child(method, path, varied, device, args.quick))
            last = runs[-1]
            held = n + n_valid if method in BOTH_SPLITS else n
            row = dict(workload=label, loop=method, samples=n, uint8_mb=held * 3 * SIDE * SIDE / 2**20, **{
                "first_batch_run1_s": runs[0].get("first_batch_s"), "first_batch_run2_s": last.get("first_batch_s"),
                "epoch_s": last.get("rest_s"), "images_per_s": last.get("images_per_s"),
                "peak_rss_run1_mb": runs[0].get("peak_rss_mb"), "peak_rss_run2_mb": last.get("peak_rss_mb"),
                "skipped": last.get("skipped")})
            row["rss_run2_over_uint8"] = (row["peak_rss_run2_mb"] or 0) / row["uint8_mb"]
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    load = (load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    _report(args, rows, env, load)
    return rows


def _cell(v: Any) -> Any:
    return "n/a" if v is None else v


def _report(args: argparse.Namespace, rows: list[dict[str, Any]], env: dict[str, Any],
            load: tuple[float, float]) -> None:
    headers = ["set", "method", "1st run: first batch s", "2nd run: first batch s", "epoch s", "images/s",
               "peak RSS 1st run MB", "peak RSS 2nd run MB", "uint8 MB", "2nd run RSS / uint8"]
    table = markdown_table(headers, [
        [r["workload"], r["loop"] if not r["skipped"] else f"{r['loop']} ({r['skipped']})",
         *(_cell(r[k]) for k in ("first_batch_run1_s", "first_batch_run2_s", "epoch_s", "images_per_s",
                                 "peak_rss_run1_mb", "peak_rss_run2_mb")), r["uint8_mb"],
         "n/a" if r["skipped"] else r["rss_run2_over_uint8"]] for r in rows])
    by = {(r["workload"], r["loop"]): r for r in rows}
    targets = []
    for label in dict.fromkeys(r["workload"] for r in rows):
        mem, disk, today = (by.get((label, m)) for m in ("nntrain-memory", "nntrain-disk", "float32-today"))
        if label.startswith("rgb32 50k"):
            for r in (mem, disk):
                targets.append(target_line(f"{label} {r['loop']}: 2nd run's first batch", "<= 1 s",
                                           f"{r['first_batch_run2_s']:.2f} s", r["first_batch_run2_s"] <= 1))
        targets.append(target_line(f"{label} nntrain-memory: peak RSS (2nd run) / uint8", "<= 1.5x",
                                   f"{mem['rss_run2_over_uint8']:.2f}x", mem["rss_run2_over_uint8"] <= 1.5))
        targets.append(target_line(f"{label} nntrain-disk: peak RSS (2nd run) / uint8", "< 0.33x",
                                   f"{disk['rss_run2_over_uint8']:.2f}x", disk["rss_run2_over_uint8"] < 1 / 3))
        if today is not None and not today["skipped"]:
            for r in (mem, disk):
                ratio = r["images_per_s"] / today["images_per_s"]
                targets.append(target_line(f"{label} {r['loop']}: images/s vs float32-today", ">= 1x",
                                           f"{ratio:.2f}x", ratio >= 1))
    notes = [
        f"batch {BATCH}, shuffled; each figure one run in a fresh process (the second run of a cached method "
        "right after its first); `epoch s` is the epoch after the first batch, of the second run when there is one.",
        "first batch: from load_from_disk to the first training batch; before it float32-today decodes the "
        f"{VALID:,}-image validation split too, nntrain decodes it into its cache on a first run (and reads it "
        "at the first validation pass); the others prepare only the training split.",
        "peak RSS: the process's peak (VmHWM) over its RSS after the imports (and a first load_from_disk, "
        "whose lazy imports are not data); it counts file pages mapped and read (the dataset's Arrow file, a "
        "memory map's pages); DataLoader and decoding worker processes are not counted. uint8 MB: the images "
        "the method holds (train and validation for float32-today, train for the others), 3 x 32 x 32 bytes each.",
        "varied: 24-64 pixels a side, loaded at 32 x 32 (size=32; the HF idioms resize in their transform); "
        "float32-today refuses it, numpy-arrays needs one size.",
        f"load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end, on {os.cpu_count()} cores: "
        "single runs, so other work on the machine shows in the figures.",
    ]
    report(args, "data_scale", rows, env, table, notes, targets, chart=dict(
        panels={label: {r["loop"]: r["images_per_s"] for r in rows if r["workload"] == label and r["images_per_s"]}
                for label in dict.fromkeys(r["workload"] for r in rows)},
        xlabel="images/s over an epoch (log scale, higher is better)", title=f"nntrain data at scale, {env['device_name']}",
        log=True))


def _child_main() -> None:
    spec = json.loads(sys.argv[sys.argv.index("--child") + 1])
    torch.set_num_threads(spec["threads"])
    print(json.dumps(measure(spec["method"], Path(spec["path"]), spec["varied"], torch.device(spec["device"]))))


if __name__ == "__main__":
    _child_main()
