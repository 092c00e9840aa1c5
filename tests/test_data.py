"""Tests for nntrain.data: the digits set, the batched and per-item loaders, detection and errors."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from nntrain.data import (
    DataLoaders,
    ResumableDataLoader,
    TensorPairDataset,
    digits_dataset_dict,
    hf_ds_collate_fn,
    load_dataset_dict,
)
from tests.helpers import tiny_data


@pytest.fixture(scope="module")
def dd() -> datasets.DatasetDict:
    return digits_dataset_dict()


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def image_dd(arrays: list[np.ndarray], labels: list[int], **names: str) -> datasets.DatasetDict:
    """A DatasetDict with the same images in "train" and "test"; `names` renames the columns."""
    x_name, y_name = names.get("x", "image"), names.get("y", "label")
    features = datasets.Features({x_name: datasets.Image(), y_name: datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({x_name: [Image.fromarray(a) for a in arrays], y_name: labels}, features=features)
    return datasets.DatasetDict({"train": ds, "test": ds})


# ----- the digits set ---------------------------------------------------------------------------------


def test_digits_dataset_dict_holds_sklearn_digits_stratified(dd):
    digits = load_digits()
    assert list(dd) == ["train", "validation"]
    assert (dd["train"].num_rows, dd["validation"].num_rows) == (1438, 359)
    assert isinstance(dd["train"].features["image"], datasets.Image)
    assert dd["train"].features["label"].names == [str(i) for i in range(10)]
    img = dd["train"][0]["image"]
    assert (img.mode, img.size) == ("L", (8, 8))
    train_counts = np.bincount(dd["train"]["label"], minlength=10)
    valid_counts = np.bincount(dd["validation"]["label"], minlength=10)
    class_counts = np.bincount(digits.target)
    np.testing.assert_array_equal(train_counts + valid_counts, class_counts)
    np.testing.assert_array_equal(valid_counts, np.round(0.2 * class_counts))
    # the same pixels as sklearn's, scaled 0..16 -> 0..255
    pixel_sum = sum(np.asarray(im, dtype=np.int64).sum() for s in dd.values() for im in s["image"])
    assert pixel_sum == np.round(digits.images * 255 / 16).sum()


def test_digits_split_is_deterministic_and_seeded(dd):
    again = digits_dataset_dict()
    other = digits_dataset_dict(seed=1)
    assert again["validation"]["label"] == dd["validation"]["label"]
    x_same, _ = all_batches(DataLoaders.from_hf_dd(again, 500, shuffle=False).valid)
    x_ref, _ = all_batches(DataLoaders.from_hf_dd(dd, 500, shuffle=False).valid)
    x_other, _ = all_batches(DataLoaders.from_hf_dd(other, 500, shuffle=False).valid)
    assert torch.equal(x_same, x_ref)
    assert x_other.shape == x_ref.shape and not torch.equal(x_other, x_ref)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_digits_rejects_bad_valid_fraction(fraction):
    with pytest.raises(ValueError, match="valid_fraction must be between 0 and 1"):
        digits_dataset_dict(valid_fraction=fraction)


def test_load_dataset_dict_digits_has_all_rows():
    dd = load_dataset_dict("digits")
    assert sorted(dd) == ["train", "validation"]
    assert sum(s.num_rows for s in dd.values()) == 1797


def test_load_dataset_dict_calls_the_hub_for_other_names(monkeypatch):
    sentinel = datasets.DatasetDict()
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: calls.append(name) or sentinel)
    monkeypatch.setattr("nntrain.data._hub_unreachable", lambda: None)  # as if the hub answered
    assert load_dataset_dict("fashion_mnist") is sentinel
    assert calls == ["fashion_mnist"]


def test_load_dataset_dict_hub_error_is_one_clear_runtime_error(monkeypatch):
    cause = ConnectionError("Couldn't reach 'fashion_mnist' on the Hub (LocalEntryNotFoundError)\nretry log")

    def offline(name):
        raise cause

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("nntrain.data._hub_unreachable", lambda: None)  # as if the hub answered
    with pytest.raises(RuntimeError) as info:
        load_dataset_dict("fashion_mnist")
    assert str(info.value) == (
        "could not load dataset 'fashion_mnist' from the hub: Couldn't reach 'fashion_mnist' on the Hub "
        "(LocalEntryNotFoundError); use --dataset digits for the embedded data"
    )
    assert info.value.__cause__ is cause


def test_load_dataset_dict_leaves_non_network_errors_alone(monkeypatch):
    def bad_config(name):
        raise ValueError("BuilderConfig 'x' not found")

    monkeypatch.setattr(datasets, "load_dataset", bad_config)
    monkeypatch.setattr("nntrain.data._hub_unreachable", lambda: None)  # as if the hub answered
    with pytest.raises(ValueError, match="BuilderConfig"):
        load_dataset_dict("some/dataset")


# ----- the batched loaders ----------------------------------------------------------------------------


def test_batched_loaders_shapes_dtypes_and_range(dd):
    dls = DataLoaders.from_hf_dd(dd, 64)
    assert (len(dls.train), len(dls.valid)) == (23, 6)  # ceil(1438 / 64), ceil(359 / 64)
    sizes = [len(xb) for xb, _ in dls.train]
    assert sizes == [64] * 22 + [1438 - 22 * 64]
    x, y = next(iter(dls.train))
    assert (x.shape, x.dtype, y.shape, y.dtype) == ((64, 64), torch.float32, (64,), torch.int64)
    xs, ys = all_batches(dls.train)
    assert (xs.min().item(), xs.max().item()) == (0.0, 1.0)
    torch.testing.assert_close(xs * 255, (xs * 255).round())  # k / 255 for integer k
    assert sorted(ys.unique().tolist()) == list(range(10))


def test_unflattened_images_are_nchw_and_match_flattened(dd):
    flat = DataLoaders.from_hf_dd(dd, 50, shuffle=False)
    square = DataLoaders.from_hf_dd(dd, 50, shuffle=False, flatten=False)
    x_sq, y_sq = next(iter(square.valid))
    x_fl, y_fl = next(iter(flat.valid))
    assert x_sq.shape == (50, 1, 8, 8)
    assert torch.equal(x_sq.reshape(50, -1), x_fl)
    assert torch.equal(y_sq, y_fl)


@pytest.mark.parametrize("flatten", [True, False])
def test_batched_path_equals_per_item_path(dd, flatten):
    batched = DataLoaders.from_hf_dd(dd, 64, shuffle=False, flatten=flatten)
    per_item = DataLoaders.from_hf_dd(dd, 64, shuffle=False, flatten=flatten, collate="per_item")
    for split in ("train", "valid"):
        pairs = list(zip(getattr(batched, split), getattr(per_item, split), strict=True))
        assert len(pairs) == len(getattr(batched, split))
        for (xb, yb), (xp, yp) in pairs:
            assert torch.equal(xb, xp) and torch.equal(yb, yp)


def test_rgb_images_keep_channel_order_in_both_paths():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (2, 3, 3), dtype=np.uint8) for _ in range(5)]
    dd = image_dd(arrays, [0, 1, 2, 3, 4])
    expected = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).float() / 255
    for collate in ("batched", "per_item"):
        x, y = next(iter(DataLoaders.from_hf_dd(dd, 5, shuffle=False, flatten=False, collate=collate).train))
        assert x.shape == (5, 3, 2, 3)
        assert torch.equal(x, expected) and y.tolist() == [0, 1, 2, 3, 4]
        x_flat, _ = next(iter(DataLoaders.from_hf_dd(dd, 5, shuffle=False, collate=collate).train))
        assert torch.equal(x_flat, expected.reshape(5, 18))


def test_shuffle_follows_manual_seed_and_changes_between_epochs(dd):
    dls = DataLoaders.from_hf_dd(dd, 64)
    torch.manual_seed(0)
    first = all_batches(dls.train)[1]
    second = all_batches(dls.train)[1]
    torch.manual_seed(0)
    replay = all_batches(dls.train)[1]
    ordered = torch.tensor(dd["train"]["label"])
    assert torch.equal(first, replay)
    assert not torch.equal(first, second)
    assert not torch.equal(first, ordered)
    assert torch.equal(first.sort().values, ordered.sort().values)


def test_generator_sets_the_train_order(dd):
    orders = []
    for _ in range(2):
        dls = DataLoaders.from_hf_dd(dd, 64, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(len(orders))  # the global seed must not matter when a generator is given
        orders.append(all_batches(dls.train)[1])
    assert torch.equal(orders[0], orders[1])


def test_valid_never_shuffles_and_keeps_its_last_batch(dd):
    dls = DataLoaders.from_hf_dd(dd, 64, shuffle=True, drop_last=True)
    _, ys = all_batches(dls.valid)
    assert torch.equal(ys, torch.tensor(dd["validation"]["label"]))
    assert len(dls.valid) == 6 and len(dls.train) == 22  # drop_last applies to train only


def test_tensor_pair_dataset_serves_whole_batches():
    ds = TensorPairDataset(torch.arange(10.0).reshape(5, 2), torch.arange(5))
    x, y = ds.__getitems__([4, 0, 2])
    assert torch.equal(x, torch.tensor([[8.0, 9.0], [0.0, 1.0], [4.0, 5.0]]))
    assert y.tolist() == [4, 0, 2]
    assert len(ds) == 5 and ds[1][1].item() == 1
    with pytest.raises(ValueError, match="same length"):
        TensorPairDataset(torch.zeros(3, 2), torch.zeros(4))


def test_hf_ds_collate_fn_stacks_each_column():
    arrays = [np.full((2, 2), v, dtype=np.uint8) for v in (0, 51, 255)]
    rows = [{"image": Image.fromarray(a), "label": i} for i, a in enumerate(arrays)]
    x, y = hf_ds_collate_fn(rows)
    assert x.shape == (3, 4) and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.tensor([0.0, 51.0, 255.0]) / 255) and y.tolist() == [0, 1, 2]
    assert hf_ds_collate_fn(rows, flatten=False)[0].shape == (3, 1, 2, 2)


# ----- detection and errors --------------------------------------------------------------------------


def test_columns_and_splits_are_detected(dd):
    renamed = dd.rename_columns({"image": "pixels", "label": "digit"})
    renamed = datasets.DatasetDict({"train": renamed["train"], "test": renamed["validation"]})
    reordered = renamed.select_columns(["digit", "pixels"])  # label column first
    x, y = next(iter(DataLoaders.from_hf_dd(reordered, 8, shuffle=False).valid))
    assert x.shape == (8, 64) and torch.equal(y, torch.tensor(dd["validation"]["label"][:8]))
    plain = dd.cast_column("label", datasets.Value("int64")).rename_column("label", "labels")
    x, y = next(iter(DataLoaders.from_hf_dd(plain, 8, shuffle=False).train))
    assert torch.equal(y, torch.tensor(dd["train"]["label"][:8]))


def test_valid_split_can_be_named(dd):
    three = datasets.DatasetDict({"train": dd["train"], "validation": dd["validation"], "extra": dd["train"]})
    dls = DataLoaders.from_hf_dd(three, 100, valid_split="extra")
    assert len(dls.valid.dataset) == 1438


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True, "64"])
def test_bad_batch_size(dd, batch_size):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        DataLoaders.from_hf_dd(dd, batch_size)


def test_bad_collate(dd):
    with pytest.raises(ValueError, match="collate must be 'batched' or 'per_item'"):
        DataLoaders.from_hf_dd(dd, 8, collate="fast")


def test_missing_splits(dd):
    with pytest.raises(ValueError, match=r"no 'train' split \(available: 'validation'\)"):
        DataLoaders.from_hf_dd(datasets.DatasetDict({"validation": dd["validation"]}), 8)
    with pytest.raises(ValueError, match=r"no validation split .*available: 'train'.*valid_split="):
        DataLoaders.from_hf_dd(datasets.DatasetDict({"train": dd["train"]}), 8)
    with pytest.raises(ValueError, match=r"valid_split 'dev' is not a split .*'train', 'validation'"):
        DataLoaders.from_hf_dd(dd, 8, valid_split="dev")


def test_missing_columns(dd):
    with pytest.raises(ValueError, match=r"x_col='img' is not a column .*'image', 'label'"):
        DataLoaders.from_hf_dd(dd, 8, x_col="img")
    with pytest.raises(ValueError, match=r"y_col='target' is not a column"):
        DataLoaders.from_hf_dd(dd, 8, y_col="target")
    with pytest.raises(ValueError, match="x_col='label' holds ClassLabel, not datasets.Image"):
        DataLoaders.from_hf_dd(dd, 8, x_col="label")
    with pytest.raises(ValueError, match="column 'label' is in the train split but not in split 'validation'"):
        DataLoaders.from_hf_dd(datasets.DatasetDict({"train": dd["train"],
                                                     "validation": dd["validation"].remove_columns("label")}), 8)


def test_undetectable_columns(dd):
    no_image = dd.cast_column("image", datasets.Image(decode=False)).map(lambda r: {"image": 0})
    with pytest.raises(ValueError, match=r"no column with a datasets.Image feature .*pass x_col="):
        DataLoaders.from_hf_dd(no_image, 8)
    two_images = dd.map(lambda r: {"copy": r["image"]}, features=datasets.Features(
        {"image": datasets.Image(), "label": dd["train"].features["label"], "copy": datasets.Image()}))
    with pytest.raises(ValueError, match=r"several columns \(image, copy\)"):
        DataLoaders.from_hf_dd(two_images, 8)
    assert len(DataLoaders.from_hf_dd(two_images, 8, x_col="copy").train.dataset) == 1438
    unnamed = dd.cast_column("label", datasets.Value("int64")).rename_column("label", "target")
    with pytest.raises(ValueError, match="cannot tell the label column.*pass y_col="):
        DataLoaders.from_hf_dd(unnamed, 8)
    _, y = next(iter(DataLoaders.from_hf_dd(unnamed, 8, y_col="target", shuffle=False).train))
    assert torch.equal(y, torch.tensor(dd["train"]["label"][:8]))


def test_images_of_different_sizes_are_refused():
    dd = image_dd([np.zeros((8, 8), np.uint8), np.zeros((4, 4), np.uint8)], [0, 1])
    with pytest.raises(ValueError, match=r"different sizes \(height, width\) \[\(4, 4\), \(8, 8\)\]; resize them"):
        DataLoaders.from_hf_dd(dd, 2)


def test_images_of_mixed_modes_are_told_to_convert_not_resize():
    dd = image_dd([np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8)], [0, 1])
    for collate in ("batched", "per_item"):
        with pytest.raises(ValueError, match=r"different modes \['L', 'RGB'\]; convert them|different shapes.*convert"):
            next(iter(DataLoaders.from_hf_dd(dd, 2, collate=collate).train))


def test_train_and_valid_images_of_different_shapes_are_refused_up_front():
    import datasets

    train = image_dd([np.zeros((4, 4), np.uint8)] * 2, [0, 1])["train"]
    valid = image_dd([np.zeros((5, 5), np.uint8)] * 2, [0, 1])["train"]
    dd = datasets.DatasetDict({"train": train, "valid": valid})
    for collate in ("batched", "per_item"):
        with pytest.raises(ValueError, match=r"split 'train' have shape .* but those of 'valid' have"):
            DataLoaders.from_hf_dd(dd, 2, collate=collate)


def test_an_empty_split_is_refused():
    import datasets

    full = image_dd([np.zeros((4, 4), np.uint8)] * 2, [0, 1])["train"]
    dd = datasets.DatasetDict({"train": full, "valid": full.select([])})
    with pytest.raises(ValueError, match="split 'valid' of the DatasetDict is empty"):
        DataLoaders.from_hf_dd(dd, 2)


# ----- ResumableDataLoader ----------------------------------------------------------------------


def test_resumable_dataloader_serves_a_plain_loaders_batches_and_continues_an_epoch_from_its_state():
    ds = tiny_data(40)
    torch.manual_seed(5)
    plain = [b[1].tolist() for b in DataLoader(ds, batch_size=8, shuffle=True)]
    torch.manual_seed(5)
    dl = ResumableDataLoader(ds, batch_size=8, shuffle=True)
    assert dl.state_dict() == {"epoch_rng": None, "served": 0}  # nothing served yet
    it = iter(dl)
    first = [next(it)[1].tolist() for _ in range(2)]
    state = dl.state_dict()
    assert first == plain[:2] and state["served"] == 2

    torch.manual_seed(77)  # the state's RNG state wins over this
    other = ResumableDataLoader(ds, batch_size=8, shuffle=True)
    other.load_state_dict(state)
    rest = [b[1].tolist() for b in other]
    assert other.resumed_at == 2 and rest == plain[2:]
    assert other.state_dict() == {"epoch_rng": None, "served": 0}  # the epoch is over
    again = [b[1].tolist() for b in other]  # a fresh epoch: the whole set, no skip
    assert other.resumed_at == 0 and len(again) == 5 and sorted(sum(again, [])) == sorted(sum(plain, []))


def test_resumable_dataloader_draws_the_epoch_order_at_the_first_batch_and_checks_states():
    dl = ResumableDataLoader(tiny_data(40), batch_size=8, shuffle=True)
    torch.manual_seed(1)
    iter(dl)  # draws nothing yet
    after_iter = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after_iter, torch.rand(1))
    with pytest.raises(ValueError, match="not a ResumableDataLoader state"):
        dl.load_state_dict({"position": 3})


def test_from_hf_dd_makes_a_resumable_train_loader():
    dls = DataLoaders.from_hf_dd(digits_dataset_dict(), batch_size=64)
    assert isinstance(dls.train, ResumableDataLoader) and isinstance(dls.valid, DataLoader)
    assert not hasattr(dls.valid, "state_dict")  # Lightning keeps no position for the validation loader
