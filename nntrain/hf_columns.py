"""Finding what `DataLoaders.from_hf_dd` loads in a Hugging Face `DatasetDict`: the train and
valid splits, the image, label and token columns, with errors that say how to fix the dataset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "VALID_SPLIT_NAMES",
    "LABEL_COLUMN_NAMES",
    "TOKEN_COLUMN_NAMES",
    "import_datasets",
    "find_splits",
    "find_columns",
    "label_column",
    "token_columns",
    "check_same_shape",
]

VALID_SPLIT_NAMES: tuple[str, ...] = ("valid", "validation", "test")
"""Split names tried, in order, for the validation loader when `valid_split` is not given."""

LABEL_COLUMN_NAMES: tuple[str, ...] = ("label", "labels")
"""Column names taken as the label column when no single column is a `ClassLabel`."""

TOKEN_COLUMN_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
"""Columns of tokenized text `from_hf_dd` batches as a mapping when the dataset has no image column."""


def import_datasets() -> Any:
    """`import datasets`, without tqdm's "IProgress not found" warning in a notebook lacking
    ipywidgets (datasets imports tqdm.auto; nntrain's own bars need no widgets)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import datasets
    return datasets


def find_splits(dd: Any, valid_split: str | None) -> tuple[str, str]:
    """The names of the train and valid splits of `dd` (a `DatasetDict` or `IterableDatasetDict`)."""
    available = ", ".join(repr(s) for s in dd) or "none"
    if "train" not in dd:
        raise ValueError(f"the DatasetDict has no 'train' split (available: {available}); rename one to 'train'")
    if valid_split is not None:
        if valid_split not in dd:
            raise ValueError(f"valid_split {valid_split!r} is not a split of the DatasetDict (available: {available})")
        return "train", valid_split
    for name in VALID_SPLIT_NAMES:
        if name in dd:
            return "train", name
    raise ValueError(
        f"the DatasetDict has no validation split named {' / '.join(VALID_SPLIT_NAMES)} (available: "
        f"{available}); pass valid_split=<name>"
    )


def label_column(features: Any, y_col: str | None) -> str:
    """The label column: `y_col`, else the one ClassLabel column, else "label"/"labels"."""
    datasets = import_datasets()

    if y_col is not None:
        return y_col
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if len(labels) != 1:
        labels = [c for c in LABEL_COLUMN_NAMES if c in features]
    if not labels:
        raise ValueError(
            f"cannot tell the label column: not exactly one ClassLabel column and none named 'label'/'labels' "
            f"(columns: {', '.join(map(repr, features))}); pass y_col=<name>"
        )
    return labels[0]


def token_columns(features: Any, x_col: str | Sequence[str] | None) -> list[str]:
    """The token columns to batch as a mapping: `x_col` when it is a list of names; with no
    `x_col` and no image column, those of `TOKEN_COLUMN_NAMES` present; else none (images)."""
    if isinstance(x_col, (list, tuple)):
        return list(x_col)
    if x_col is not None or any(type(f).__name__ == "Image" for f in features.values()):
        return []
    return [c for c in TOKEN_COLUMN_NAMES if c in features]


def find_columns(features: Any, x_col: str | None, y_col: str | None) -> tuple[str, str]:
    """The image and label column names: the given ones, checked, or detected from `features`."""
    datasets = import_datasets()

    columns = ", ".join(repr(c) for c in features)
    if x_col is None:
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        if len(images) != 1:
            found = "no column" if not images else f"several columns ({', '.join(images)})"
            raise ValueError(f"{found} with a datasets.Image feature (columns: {columns}); pass x_col=<name>")
        x_col = images[0]
    if y_col is None:
        y_col = label_column(features, None)
    for role, col in (("x_col", x_col), ("y_col", y_col)):
        if col not in features:
            raise ValueError(f"{role}={col!r} is not a column of the dataset (columns: {columns})")
    if not isinstance(features[x_col], datasets.Image):
        raise ValueError(f"x_col={x_col!r} holds {type(features[x_col]).__name__}, not datasets.Image")
    return x_col, y_col


def check_same_shape(train: tuple[int, ...], valid: tuple[int, ...], train_name: str, valid_name: str) -> None:
    """Raise a ValueError when the train and valid images differ in shape (the model fits one)."""
    if train != valid:
        raise ValueError(
            f"the images of split {train_name!r} have shape {train} but those of {valid_name!r} have "
            f"{valid}: make both splits one mode and size (convert, resize; or pass size=)"
        )
