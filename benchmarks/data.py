"""Data-loading throughput: the seed's per-item collate vs the batched `from_hf_dd` (vs a plain DataLoader) vs a device-resident loader.

    python -m benchmarks.data [--quick] [--device cpu|cuda] [--out DIR] [--part loaders|scale|all]

`--part scale` runs `benchmarks.data_scale` instead (or after, with `all`): nntrain's uint8
loaders against today's float32 path, the Hugging Face idioms and numpy arrays on generated
sets of 50k and 200k images and a varied-size set (its options: `--sizes`, `--varied`,
`--data-dir`). The default, `loaders`, is the part described here.

The embedded digits train split is repeated to 60,000 samples (batch 64). Each loader is timed
over one shuffled epoch; host loaders' batches are moved to the device inside the timed region
(a no-op on CPU). One-off set-up (building the loaders, decoding, copying to the device) is
reported apart. After a warm-up epoch each, the loaders run in interleaved, rotating order.
"""

from __future__ import annotations

import gc
import json
import time

import datasets
import torch

from benchmarks import data_scale
from benchmarks.common import (
    base_parser,
    env_info,
    markdown_table,
    median,
    report,
    setup_device,
    spread,
    sync,
    target_line,
)
from nntrain.data import BatchLoader, DataLoaders, digits_dataset_dict, pre_batched_collate

SEED = 0
BATCH = 64
SAMPLES = 60_000
SAMPLES_QUICK = 2_048
REPEATS = 7
LOOPS = ("per_item", "batched", "plain", "device")
"""`batched` is `from_hf_dd`'s train loader (a `ResumableDataLoader`); `plain` is a `BatchLoader` (a
torch `DataLoader` that makes the same floats per batch) with the same arguments over the same
uint8 images, to show what resumability costs."""


class DeviceLoader:
    """Batches sliced from tensors already on the device, by a shuffled index made on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        perm = torch.randperm(len(self.x), device=self.x.device)
        for i in range(0, len(self.x), self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]


def scaled_digits(n: int) -> datasets.DatasetDict:
    """The digits DatasetDict with its train split repeated (and cut) to `n` samples."""
    dd = digits_dataset_dict()
    train = dd["train"]
    big = datasets.concatenate_datasets([train] * -(-n // len(train))).select(range(n))
    datasets.disable_progress_bars()
    return datasets.DatasetDict({"train": big.flatten_indices(), "validation": dd["validation"]})


def epoch_seconds(loader, device: torch.device) -> float:
    """Seconds to draw every batch of `loader` onto `device`."""
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    n = 0
    for x, y in loader:
        if x.device != device:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n += y.shape[0]
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark's part(s); print and write the results. Returns the rows."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("loaders", "scale", "all"), default="loaders",
                        help="loaders: this throughput table (default); scale: benchmarks.data_scale; all: both")
    data_scale.add_arguments(parser)
    args = parser.parse_args(argv)
    rows = run_loaders(args) if args.part in ("loaders", "all") else []
    if args.part in ("scale", "all"):
        rows += data_scale.run(args)
    return rows


def run_loaders(args) -> list[dict]:
    """The loaders part: per-item vs batched vs plain vs device-resident epochs on scaled digits."""
    device = setup_device(args.device, args.threads)
    repeats = args.repeats or (1 if args.quick else REPEATS)
    n = SAMPLES_QUICK if args.quick else SAMPLES
    env = env_info(device)
    print(f"device {env['device_name']} ({device.type}), torch {env['torch']}, lightning {env['lightning']}, "
          f"torch.set_num_threads({env['threads']}), {repeats} interleaved repeats, median reported")

    torch.manual_seed(SEED)
    dd = scaled_digits(n)
    setup, loaders = {}, {}
    t0 = time.perf_counter()
    loaders["per_item"] = DataLoaders.from_hf_dd(dd, BATCH, collate="per_item").train
    setup["per_item"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaders["batched"] = DataLoaders.from_hf_dd(dd, BATCH, collate="batched").train
    setup["batched"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = loaders["batched"].dataset  # reuse its decoded tensors: the device copy is the only extra
    loaders["plain"] = BatchLoader(ds, BATCH, shuffle=True, collate_fn=pre_batched_collate,
                                   finish=loaders["batched"].finish)
    setup["plain"] = setup["batched"]
    loaders["device"] = DeviceLoader(ds.x.to(device), ds.y.to(device), BATCH)
    sync(device)
    setup["device"] = setup["batched"] + time.perf_counter() - t0

    for loader in loaders.values():  # warm-up: one epoch each
        epoch_seconds(loader, device)
    times: dict[str, list[float]] = {name: [] for name in LOOPS}
    for r in range(repeats):
        for name in LOOPS[r % len(LOOPS):] + LOOPS[:r % len(LOOPS)]:
            times[name].append(epoch_seconds(loaders[name], device))

    rows = []
    per_item = n / median(times["per_item"])
    for name in LOOPS:
        rate = [n / t for t in times[name]]
        row = dict(workload=f"digits{n // 1000}k", loop=name, batch_size=BATCH, samples=n, repeats=repeats,
                   samples_per_s=median(rate), samples_per_s_iqr=spread(rate),
                   us_per_batch=median(times[name]) / len(loaders[name]) * 1e6,
                   ratio_to_per_item=median(rate) / per_item, setup_s=setup[name])
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))

    by = {r["loop"]: r for r in rows}
    targets = [
        target_line("batched vs per_item samples/s", ">= 50x", f"{by['batched']['ratio_to_per_item']:.1f}x",
                    by["batched"]["ratio_to_per_item"] >= 50),
        target_line("batched (ResumableDataLoader) vs plain DataLoader samples/s", "(reported)",
                    f"{by['batched']['samples_per_s'] / by['plain']['samples_per_s']:.3f}x", None),
        target_line("device vs per_item samples/s", "(reported)", f"{by['device']['ratio_to_per_item']:.1f}x", None),
    ]
    headers = ["workload", "loader", "batch", "samples/s", "IQR samples/s", "µs/batch", "× per_item", "set-up s"]
    table = markdown_table(headers, [[r["workload"], r["loop"], r["batch_size"], r["samples_per_s"],
                                      r["samples_per_s_iqr"], r["us_per_batch"], r["ratio_to_per_item"],
                                      r["setup_s"]] for r in rows])
    notes = [f"{repeats} interleaved repeats of one shuffled epoch ({n} samples) after one warm-up epoch each; "
             "medians. Set-up (loader construction, decoding, device copy) is not in samples/s.",
]
    report(args, "data", rows, env, table, notes, targets, chart=dict(
        panels={f"digits x{n} (batch {BATCH})": {r["loop"]: r["samples_per_s"] for r in rows}},
        xlabel="samples/s (log scale, higher is better)", title=f"nntrain data loading, {env['device_name']}", log=True))
    return rows


if __name__ == "__main__":
    main()
