"""What datasets exist, and the one error type the data layer raises.

This module imports nothing heavy (no torch, torchvision, scikit-learn or PIL), so that
`dclang check` and the front end's name validation, did-you-mean and `--help` can list the
datasets, their sizes and the default data folder without loading any data or library.
`dclang.data` re-exports everything here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class DataError(Exception):
    """A user-facing data problem.

    The message says what was looked for, where, and what to do about it; the front end
    prints it as is, without a traceback.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """Shape of a dataset, known before loading it.

    A field is None where it depends on the user's files (`imagefolder`, `npz`): the real
    value is on the loaded `Dataset`.
    """

    num_classes: int | None
    channels: int | None
    image_size: int | None
    description: str


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        10, 1, 8,
        "scikit-learn's 8x8 handwritten digits, 1797 images, offline; a fixed stratified 20% "
        "is the test set"),
    "cifar10": DatasetInfo(10, 3, 32, "CIFAR-10, 50000 train / 10000 test 32x32 colour images"),
    "cifar100": DatasetInfo(100, 3, 32, "CIFAR-100 (fine labels), 50000 train / 10000 test 32x32 colour images"),
    "tinyimagenet": DatasetInfo(
        200, 3, 64,
        "Tiny ImageNet, 100000 train 64x64 colour images; its labelled official val set is the test set"),
    "imagefolder": DatasetInfo(
        None, 3, None,
        "your images in train/<class>/ and test/<class>/ (or val/) under the data block's `path`, all one size"),
    "npz": DatasetInfo(None, None, None,
                       "an .npz file at the data block's `path` holding x_train, y_train, x_test, y_test"),
}


def default_data_dir() -> Path:
    """Where downloadable datasets live unless `--data-dir` says otherwise: `$DCLANG_DATA`,
    else `~/.cache/dclang/data`."""
    env = os.environ.get("DCLANG_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dclang" / "data"
