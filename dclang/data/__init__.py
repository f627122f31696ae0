"""The data layer: datasets held whole in memory as uint8 tensors, split and batched on device.

    >>> from dclang.data import load_dataset
    >>> ds = load_dataset("digits", data_dir=None, val_split=0.1, split_seed=0)
    >>> len(ds.train), len(ds.val), len(ds.test)
    (1293, 144, 360)

Python imports this package before any of its modules, so it must stay light for
`dclang.data.catalog` (`DATASETS`, `DataError`, `default_data_dir`) to be importable without
torch by `dclang check` and the front end. The catalogue names are imported here directly;
the torch-based names are imported on first use (PEP 562 module `__getattr__`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dclang.data.catalog import DATASETS, DataError, DatasetInfo, default_data_dir
from dclang.lazy import lazy_exports

if TYPE_CHECKING:  # the lazy names below, for type checkers and IDEs
    from dclang.data.augment import BatchAugment, TransformedSplit, normalize, per_sample_transforms
    from dclang.data.batches import BatchIterator, epoch_generator
    from dclang.data.dataset import Dataset, Split, channel_stats, split_indices
    from dclang.data.sources import load_dataset

_LAZY = {
    "Dataset": "dclang.data.dataset", "Split": "dclang.data.dataset",
    "split_indices": "dclang.data.dataset", "channel_stats": "dclang.data.dataset",
    "load_dataset": "dclang.data.sources",
    "BatchAugment": "dclang.data.augment", "normalize": "dclang.data.augment",
    "per_sample_transforms": "dclang.data.augment", "TransformedSplit": "dclang.data.augment",
    "BatchIterator": "dclang.data.batches", "epoch_generator": "dclang.data.batches",
}

__all__ = ["DATASETS", "DataError", "DatasetInfo", "default_data_dir", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
