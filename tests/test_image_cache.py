"""Decoded images as uint8: every mode (in memory, memory-mapped, no cache, worker processes,
per item) gives the same batches; the cache is reused and rebuilt when the options change;
images of any size load with `size=`; floats are made on the loader's device."""

from __future__ import annotations

import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import nntrain.image_cache as image_cache
from nntrain.data import DataLoaders, DiskArray, ImageArrayDataset
from nntrain.images import ImageSpec

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})


def images(n: int, seed: int, sizes: list[tuple[int, int]] | None = None, mode: str = "RGB") -> datasets.Dataset:
    """`n` random images (5 x 6, or the `sizes` (h, w) in turn) with labels 0..3."""
    rng = np.random.default_rng(seed)
    shapes = [sizes[i % len(sizes)] if sizes else (5, 6) for i in range(n)]
    channels = () if mode == "L" else (3,)
    pics = [Image.fromarray(rng.integers(0, 256, (*s, *channels), dtype=np.uint8)) for s in shapes]
    return datasets.Dataset.from_dict({"image": pics, "label": [i % 4 for i in range(n)]}, features=FEATURES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A DatasetDict saved and reloaded as `load_from_disk` gives it (its cache files on disk)."""
    path = tmp_path_factory.mktemp("dd") / "dd"
    datasets.DatasetDict({"train": images(40, 0), "test": images(12, 1)}).save_to_disk(str(path))
    return str(path)


def batches(dls: DataLoaders, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    return [(x.clone(), y.clone()) for x, y in dls.train] + [(x.clone(), y.clone()) for x, y in dls.valid]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_every_mode_gives_the_same_batches(saved, tmp_path):
    dd = datasets.load_from_disk(saved)
    reference = batches(DataLoaders.from_hf_dd(dd, 16, flatten=False, collate="per_item"))
    modes = [dict(in_memory=True), dict(in_memory=False), dict(cache=False), dict(cache=False, in_memory=False),
             dict(cache=tmp_path, decode_workers=2), dict(in_memory=False, num_workers=1)]
    for kw in modes:
        dls = DataLoaders.from_hf_dd(dd, 16, flatten=False, **kw)
        assert_same(batches(dls), reference)
        ds = dls.train.dataset
        assert isinstance(ds, ImageArrayDataset) and ds.in_memory == (kw.get("in_memory", True) is not False)
    flat = DataLoaders.from_hf_dd(dd, 16, in_memory=False)
    assert_same(batches(flat), [(x.reshape(len(x), -1), y) for x, y in reference])
    in_order = DataLoaders.from_hf_dd(dd, 40, shuffle=False, collate="per_item")
    assert torch.equal(flat.train.dataset.x, next(iter(in_order.train))[0])  # the whole set, for to_device_loaders
    held = DataLoaders.from_hf_dd(dd, 16, in_memory=True)
    assert isinstance(held.valid.dataset.images, DiskArray)  # read into memory when first used
    next(iter(held.valid))
    assert isinstance(held.valid.dataset.images, np.ndarray)
    x0, y0 = DataLoaders.from_hf_dd(dd, 16, in_memory=False).train.dataset[0]
    assert x0.dtype == torch.uint8 and x0.shape == (3, 5, 6) and y0 == 0


def test_the_cache_is_reused_and_rebuilt_when_the_options_change(saved, monkeypatch):
    dd = datasets.load_from_disk(saved)
    first = image_cache.cache_path(dd["train"], "image", ImageSpec(), True)
    assert first.parent == image_cache.Path(dd["train"].cache_files[0]["filename"]).parent
    DataLoaders.from_hf_dd(dd, 8)
    assert first.exists()
    built = first.stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_cache, "decode_column", no_decoding)
    again = DataLoaders.from_hf_dd(datasets.load_from_disk(saved), 8, in_memory=False)  # another run's objects
    assert again.train.dataset.images.path == str(first) and first.stat().st_mtime_ns == built
    with pytest.raises(AssertionError, match="decoded again"):
        DataLoaders.from_hf_dd(dd, 8, size=4)  # other options: another file, decoded
    monkeypatch.undo()
    DataLoaders.from_hf_dd(dd, 8, size=4)
    files = sorted(p.name for p in first.parent.glob("nntrain-images-*.npy"))
    assert len(files) == 2  # as stored and at size 4 (the test split's files are next to its own)
    held = datasets.DatasetDict({"train": images(8, 0), "test": images(4, 1)})  # in memory: no cache file
    DataLoaders.from_hf_dd(held, 8)
    assert sorted(p.name for p in first.parent.glob("nntrain-images-*.npy")) == files


def test_an_index_mapping_is_followed_and_an_unwritable_cache_falls_back_with_a_warning(saved, monkeypatch):
    dd = datasets.load_from_disk(saved).shuffle(seed=3)  # rows through an index mapping
    reference = batches(DataLoaders.from_hf_dd(dd, 16, flatten=False, collate="per_item", shuffle=False))
    assert_same(batches(DataLoaders.from_hf_dd(dd, 16, flatten=False, shuffle=False)), reference)

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(image_cache, "_write_npy", read_only)
    with pytest.warns(RuntimeWarning, match="cannot cache the decoded images in .*decoding without a cache"):
        dls = DataLoaders.from_hf_dd(dd, 16, flatten=False, shuffle=False, size=3)
    assert dls.train.dataset.in_memory and next(iter(dls.train))[0].shape == (16, 3, 3, 3)


def test_images_of_any_size_load_with_size_and_each_resize_matches_pil():
    sizes = [(5, 6), (9, 4), (3, 3), (4, 6)]
    dd = datasets.DatasetDict({"train": images(8, 0, sizes), "test": images(4, 1, sizes)})
    with pytest.raises(ValueError, match=r"different sizes \(height, width\) .*pass size="):
        DataLoaders.from_hf_dd(dd, 4)
    for resize, fit in (("squish", lambda im: im.resize((6, 4), Image.Resampling.BILINEAR)),
                        ("crop", lambda im: ImageOps.fit(im, (6, 4), Image.Resampling.BILINEAR)),
                        ("pad", lambda im: ImageOps.pad(im, (6, 4), Image.Resampling.BILINEAR, color=0))):
        dls = DataLoaders.from_hf_dd(dd, 4, size=(4, 6), resize=resize, shuffle=False, flatten=False, cache=False)
        x, _ = next(iter(dls.train))
        assert x.shape == (4, 3, 4, 6)
        expected = [np.asarray(fit(dd["train"][i]["image"])) for i in range(4)]
        assert torch.equal(x, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2).float() / 255), resize
        per_item = DataLoaders.from_hf_dd(dd, 4, size=(4, 6), resize=resize, shuffle=False, flatten=False,
                                          collate="per_item")
        assert torch.equal(next(iter(per_item.train))[0], x)
    square = DataLoaders.from_hf_dd(dd, 4, size=3, shuffle=False, flatten=False, cache=False)
    assert next(iter(square.valid))[0].shape == (4, 3, 3, 3)
    with pytest.raises(ValueError, match="size must be a positive int"):
        DataLoaders.from_hf_dd(dd, 4, size=(4, 0))
    with pytest.raises(ValueError, match="resize must be 'squish', 'crop' or 'pad'"):
        DataLoaders.from_hf_dd(dd, 4, size=4, resize="stretch")


def test_in_memory_by_default_follows_the_available_memory(saved, monkeypatch):
    dd = datasets.load_from_disk(saved)
    monkeypatch.setattr(image_cache, "available_memory", lambda: 1000)  # the 40 x 90 bytes do not fit in half
    assert not DataLoaders.from_hf_dd(dd, 8).train.dataset.in_memory
    monkeypatch.setattr(image_cache, "available_memory", lambda: 10**9)
    assert DataLoaders.from_hf_dd(dd, 8).train.dataset.in_memory


def resident_file_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    return 0


def test_a_disk_array_reads_rows_into_the_batch_and_keeps_no_file_pages(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, (4096, 3, 32, 32), dtype=np.uint8)  # 12 MiB
    np.save(tmp_path / "a.npy", data)
    arr = DiskArray(tmp_path / "a.npy")
    before = resident_file_bytes()
    order = np.random.default_rng(1).permutation(4096)
    for start in range(0, 4096, 64):
        idx = order[start:start + 64]
        assert np.array_equal(arr.take(idx), data[idx])
    if before:  # Linux: the rows went into the batches, the file's pages stayed in the page cache
        assert resident_file_bytes() - before < 2 << 20
    clone = pickle.loads(pickle.dumps(arr))  # a worker's copy opens its own file
    assert clone._fd == -1 and np.array_equal(clone.take(np.arange(5)), data[:5])
    with open(tmp_path / "a.npy", "r+b") as f:  # cut short (a full disk, a stray truncate)
        f.truncate(arr.offset + 4000 * arr.row_bytes)
    with pytest.raises(OSError, match="ends before row 4095: the cache file was cut short"):
        DiskArray(tmp_path / "a.npy").take(np.array([0, 4095]))
    np.save(tmp_path / "a.npy", data)
    monkeypatch.delattr("os.preadv")  # no positioned reads (Windows): a memory map
    assert np.array_equal(DiskArray(tmp_path / "a.npy").take(order[:7]), data[order[:7]])


def test_uint8_batches_become_floats_on_the_loaders_device_cpu_and_cuda(saved):
    dd = datasets.load_from_disk(saved)
    host = batches(DataLoaders.from_hf_dd(dd, 16, flatten=False))
    assert_same(batches(DataLoaders.from_hf_dd(dd, 16, flatten=False, device="cpu")), host)
    if torch.cuda.is_available():
        on_gpu = batches(DataLoaders.from_hf_dd(dd, 16, flatten=False, device="cuda"))
        assert all(x.is_cuda and y.is_cuda for x, y in on_gpu)
        assert_same([(x.cpu(), y.cpu()) for x, y in on_gpu], host)


def test_images_that_differ_in_mode_are_refused_with_the_fix():
    mixed = datasets.concatenate_datasets([images(3, 0), images(3, 1, mode="L")])
    dd = datasets.DatasetDict({"train": mixed, "test": mixed})
    with pytest.raises(ValueError, match=r"different modes \['L', 'RGB'\]; convert them"):
        DataLoaders.from_hf_dd(dd, 2, cache=False)
    converted = dd.cast_column("image", datasets.Image(mode="RGB"))
    assert next(iter(DataLoaders.from_hf_dd(converted, 6, flatten=False, cache=False).train))[0].shape == (6, 3, 5, 6)
