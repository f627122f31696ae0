"""Tests for dclang.data: every dataset format on disk, the splits, augmentation and batching.

The downloadable datasets are faked in tmp_path in their real on-disk formats: CIFAR pickles
written the way the official Python 2 files are (so torchvision's own reader accepts them
too, once its md5 check is bypassed), a Tiny ImageNet tree of real JPEGs, an image folder of
PNGs and .npz files. Nothing touches the network: the one download is monkeypatched to fail.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dclang.data import (
    DATASETS,
    BatchAugment,
    BatchIterator,
    DataError,
    Split,
    TransformedSplit,
    channel_stats,
    epoch_generator,
    load_dataset,
    normalize,
    per_sample_transforms,
    split_indices,
)

# ---------------------------------------------------------------- catalogue


def test_catalog_imports_nothing_heavy():
    code = ("import sys, dclang.data.catalog as c; assert c.DATASETS and c.DataError; "
            "print(sorted({'torch', 'torchvision', 'sklearn', 'PIL'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_dataset_lists_known_names():
    with pytest.raises(DataError) as err:
        load_dataset("cifar11", data_dir=None, val_split=0, split_seed=0)
    for name in DATASETS:
        assert name in str(err.value)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", data_dir=None, val_split=0.1, split_seed=0, download=False)


def test_digits_sizes_and_catalog(digits):
    info = DATASETS["digits"]
    assert (digits.num_classes, digits.channels, digits.image_size) == (info.num_classes, info.channels,
                                                                           info.image_size) == (10, 1, 8)
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1293, 144, 360)  # 1797; 20% test
    for split in (digits.train, digits.val, digits.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 8, 8)
        assert split.labels.dtype == torch.int64


def _rows(*splits: Split) -> list[bytes]:
    """Each sample as bytes (pixels then label), sorted: a multiset that ignores order."""
    return sorted(s.images[i].numpy().tobytes() + bytes([int(s.labels[i])]) for s in splits for i in range(len(s)))


def test_digits_splits_partition_the_scaled_data(digits):
    # Digits has duplicate images, so compare multisets: no sample lost, none used twice.
    from sklearn.datasets import load_digits

    raw = load_digits()
    expected = np.rint(raw.images * 255 / 16).astype(np.uint8)[:, None]
    assert _rows(digits.train, digits.val, digits.test) == _rows(
        Split(torch.from_numpy(expected), torch.from_numpy(raw.target).long()))


def test_digits_test_split_is_fixed_and_stratified(digits):
    other = load_dataset("digits", data_dir=None, val_split=50, split_seed=7)
    assert torch.equal(other.test.images, digits.test.images) and torch.equal(other.test.labels, digits.test.labels)
    assert len(other.val) == 50 and not torch.equal(other.train.labels[:100], digits.train.labels[:100])
    per_class_total = torch.bincount(torch.cat([digits.train.labels, digits.val.labels, digits.test.labels]))
    assert (torch.bincount(digits.test.labels) - 0.2 * per_class_total).abs().max() <= 1


def test_digits_same_seed_same_split(digits):
    again = load_dataset("digits", data_dir=None, val_split=0.1, split_seed=0)
    for a, b in ((again.train, digits.train), (again.val, digits.val)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_mean_std_come_from_the_official_train_set(digits):
    pool = torch.cat([digits.train.images, digits.val.images]).double() / 255
    assert digits.mean[0] == pytest.approx(pool.mean().item(), abs=1e-9)
    assert digits.std[0] == pytest.approx(pool.std(unbiased=False).item(), abs=1e-9)


# ---------------------------------------------------------------- validation split


@pytest.mark.parametrize("val_split, n_val", [(0, 0), (0.0, 0), (7, 7), (0.25, 25), (99, 99)])
def test_split_indices_partition(val_split, n_val):
    train, val = split_indices(100, val_split, split_seed=3)
    assert len(val) == n_val and len(train) == 100 - n_val
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))


def test_split_indices_depend_only_on_the_seed():
    assert all(torch.equal(a, b) for a, b in zip(split_indices(1000, 0.1, 5), split_indices(1000, 0.1, 5)))
    assert not torch.equal(split_indices(1000, 0.1, 5)[1], split_indices(1000, 0.1, 6)[1])


@pytest.mark.parametrize("val_split", [1.0, -0.1, -1, 100, True, "0.1"])
def test_split_indices_refuse_bad_val_split(val_split):
    with pytest.raises(DataError, match="val_split"):
        split_indices(100, val_split, 0)


def test_a_fraction_that_holds_out_no_image_is_refused():
    with pytest.raises(DataError, match=r"val_split=0.004 of 100 training images holds out none"):
        split_indices(100, 0.004, 0)
    assert len(split_indices(100, 0.01, 0)[1]) == 1


def test_train_val_test_are_disjoint_by_sample_identity(tmp_path):
    # Every image encodes its own id in two pixels, so overlap is seen by identity, not content.
    ids = np.arange(300)
    x = np.zeros((300, 4, 4), np.uint8)
    x[:, 0, 0], x[:, 0, 1] = ids // 256, ids % 256
    np.savez(tmp_path / "ids.npz", x_train=x[:240], y_train=ids[:240] % 3, x_test=x[240:], y_test=ids[240:] % 3)
    ds = load_dataset("npz", data_dir=None, val_split=0.2, split_seed=1, path=str(tmp_path / "ids.npz"))

    def ids_of(split):
        got = split.images[:, 0, 0, 0].long() * 256 + split.images[:, 0, 0, 1].long()
        assert torch.equal(split.labels, got % 3)  # each label still belongs to its image
        return set(got.tolist())

    train, val, test = ids_of(ds.train), ids_of(ds.val), ids_of(ds.test)
    assert (len(train), len(val), len(test)) == (192, 48, 60)
    assert not (train & val or train & test or val & test)
    assert train | val == set(range(240)) and test == set(range(240, 300))


# ---------------------------------------------------------------- CIFAR


class _Py2Pickler(pickle._Pickler):
    """Pickles str and bytes as Python 2 `str` (BINSTRING), as the official CIFAR files are:
    they load only with encoding="latin1" (str keys) or "bytes" (b'data' keys)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _dump(obj, file: Path, py2: bool):
    with open(file, "wb") as f:
        (_Py2Pickler(f, protocol=2) if py2 else pickle.Pickler(f)).dump(obj)


def _fake_cifar(root: Path, num_classes: int, py2: bool) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny cifar-10-batches-py/ (py2-style pickles) or cifar-100-python/ (Python 3 pickles
    with bytes keys, as the CIFAR page's loader sees them). Returns file -> (rows, labels)."""
    rng = np.random.default_rng(num_classes)
    if num_classes == 10:
        folder, files, label_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels"
        files.append("test_batch")
        meta = ("batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    else:
        folder, files, label_key = root / "cifar-100-python", ["train", "test"], "fine_labels"
        meta = ("meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                         "coarse_label_names": [f"c{i}" for i in range(20)]})
    folder.mkdir(parents=True)
    written = {}
    for name in files:
        rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, 3).tolist()
        entry = {"batch_label": name, "data": rows, label_key: labels,
                 "filenames": [f"{name}_{i}.png" for i in range(3)]}
        if num_classes == 100:
            entry["coarse_labels"] = [y // 5 for y in labels]
        if not py2:
            entry = {k.encode(): v for k, v in entry.items()}
        _dump(entry, folder / name, py2)
        written[name] = (rows, labels)
    _dump(meta[1], folder / meta[0], py2)
    return written


def test_cifar10_reads_the_official_pickle_format(tmp_path):
    written = _fake_cifar(tmp_path, 10, py2=True)
    ds = load_dataset("cifar10", data_dir=tmp_path, val_split=0, split_seed=0, download=False)
    assert (ds.num_classes, ds.channels, ds.image_size) == (10, 3, 32)
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    # val_split=0 keeps the official order: rows of R, G, B planes become (3, 32, 32)
    train_rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(ds.train.images, torch.from_numpy(train_rows.reshape(-1, 3, 32, 32)))
    assert ds.train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert torch.equal(ds.test.images.flatten(1), torch.from_numpy(written["test_batch"][0]))
    assert ds.test.labels.tolist() == written["test_batch"][1]


def test_cifar_reader_agrees_with_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets
    import torchvision.datasets.cifar

    _fake_cifar(tmp_path, 10, py2=True)
    ds = load_dataset("cifar10", data_dir=tmp_path, val_split=0, split_seed=0, download=False)
    with pytest.raises(RuntimeError):  # torchvision refuses the fake: its md5 is not the official one
        torchvision.datasets.CIFAR10(str(tmp_path), train=False)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    for train, split in ((True, ds.train), (False, ds.test)):
        tv = torchvision.datasets.CIFAR10(str(tmp_path), train=train)
        assert torch.equal(split.images, torch.from_numpy(tv.data).permute(0, 3, 1, 2))
        assert split.labels.tolist() == tv.targets


def test_cifar100_with_bytes_keys(tmp_path):
    written = _fake_cifar(tmp_path, 100, py2=False)
    # val_split=0: each of the 3 fake training images has a class of its own, and a validation
    # split may not take a class's every training image
    ds = load_dataset("cifar100", data_dir=str(tmp_path), val_split=0, split_seed=0, download=False)
    assert (ds.num_classes, len(ds.train), len(ds.val), len(ds.test)) == (100, 3, 0, 3)
    assert ds.mean == (0.5071, 0.4865, 0.4409)
    assert ds.test.labels.tolist() == written["test"][1]


@pytest.mark.parametrize("name, folder, files", [
    ("cifar10", "cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch"]),
    ("cifar100", "cifar-100-python", ["train", "test"]),
])
def test_cifar_missing_says_where_and_what(tmp_path, name, folder, files):
    with pytest.raises(DataError) as err:
        load_dataset(name, data_dir=tmp_path / "data", val_split=0.1, split_seed=0, download=False)
    message = str(err.value)
    for part in [str(tmp_path / "data"), folder + "/", "--data-dir", "not found", *files]:
        assert part in message


def test_cifar_failed_download_becomes_data_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz failed: <urlopen error no network>") as err:
        load_dataset("cifar10", data_dir=tmp_path, val_split=0.1, split_seed=0, download=True)
    assert str(tmp_path) in str(err.value) and "cifar-10-batches-py/" in str(err.value)


def test_cifar_partial_or_damaged_folder(tmp_path):
    _fake_cifar(tmp_path, 10, py2=True)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing in .*: data_batch_3 \("):
        load_dataset("cifar10", data_dir=tmp_path, val_split=0, split_seed=0, download=False)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR batch"):
        load_dataset("cifar10", data_dir=tmp_path, val_split=0, split_seed=0, download=False)
    _dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, folder / "data_batch_3", py2=True)
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR batch: expected 'data' uint8 of shape"):
        load_dataset("cifar10", data_dir=tmp_path, val_split=0, split_seed=0, download=False)


def test_path_is_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(DataError, match="the data block's `path` is only used by"):
        load_dataset("cifar10", data_dir=tmp_path, val_split=0, split_seed=0, path=str(tmp_path))
    with pytest.raises(DataError,
                       match=r'reads your own data: give its location with `path = "..."` in the data block'):
        load_dataset("npz", data_dir=None, val_split=0, split_seed=0)


# ---------------------------------------------------------------- image files

_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _image(file: Path, colour, size=(64, 64), mode="RGB"):
    from PIL import Image

    file.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    (image.convert("L") if mode == "L" else image).save(file)


@pytest.fixture
def tiny_imagenet(tmp_path) -> Path:
    """tiny-imagenet-200/ with 3 classes of solid-colour JPEGs (one grayscale), as unzipped."""
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid, colour in zip(wnids, _COLOURS):
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
        for i in range(2):
            _image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", colour)
    _image(root / "train" / wnids[0] / "images" / f"{wnids[0]}_2.JPEG", (200, 200, 200), mode="L")
    lines = []
    for i, (wnid, colour) in enumerate(zip(wnids[::-1], _COLOURS[::-1])):
        _image(root / "val" / "images" / f"val_{i}.JPEG", colour)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)  # unlabelled official test set: unused
    return tmp_path


def test_tinyimagenet_layout(tiny_imagenet):
    ds = load_dataset("tinyimagenet", data_dir=tiny_imagenet, val_split=0, split_seed=0)
    assert (ds.num_classes, ds.channels, ds.image_size) == (3, 3, 64)
    assert ds.train.images.shape == (7, 3, 64, 64) and ds.test.images.shape == (3, 3, 64, 64)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2] and ds.test.labels.tolist() == [2, 1, 0]
    colour = ds.train.images.float().mean(dim=(2, 3))
    gray = colour[2]  # n01443537_2.JPEG, sorted after _0 and _1
    assert torch.allclose(gray, gray[0].expand(3), atol=1) and abs(gray[0].item() - 200) < 3
    for split in (ds.train, ds.test):
        coloured = [i for i in range(len(split)) if split is ds.test or i != 2]
        assert split.labels[coloured].tolist() == split.images[coloured].float().mean(dim=(2, 3)).argmax(1).tolist()


def test_tinyimagenet_missing_and_wrong_size(tmp_path, tiny_imagenet):
    with pytest.raises(DataError, match="tiny-imagenet-200/") as err:
        load_dataset("tinyimagenet", data_dir=tmp_path / "elsewhere", val_split=0, split_seed=0)
    assert str(tmp_path / "elsewhere") in str(err.value)
    bad = tiny_imagenet / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG"
    _image(bad, (0, 0, 0), size=(32, 32))
    with pytest.raises(DataError, match=f"{bad} is 32x32 pixels .* are 64x64"):
        load_dataset("tinyimagenet", data_dir=tiny_imagenet, val_split=0, split_seed=0)
    first = tiny_imagenet / "tiny-imagenet-200" / "train" / "n01443537" / "images" / "n01443537_0.JPEG"
    _image(first, (0, 0, 0), size=(32, 32))
    with pytest.raises(DataError, match=f"{first} is 32x32 pixels .* expected 64x64"):
        load_dataset("tinyimagenet", data_dir=tiny_imagenet, val_split=0, split_seed=0)
    (tiny_imagenet / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("\n")
    with pytest.raises(DataError, match="val_annotations.txt lists no images: the test split"):
        load_dataset("tinyimagenet", data_dir=tiny_imagenet, val_split=0, split_seed=0)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """train/ and test/ of 6x6 PNGs, pixels chosen per image; returns the folder."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for split, count in (("train", 3), ("test", 1)):
        for cls in ("dog", "cat"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagefolder_reads_pixels_exactly(image_folder):
    from PIL import Image

    ds = load_dataset("imagefolder", data_dir=None, val_split=0, split_seed=0, path=str(image_folder))
    assert (ds.num_classes, ds.channels, ds.image_size) == (2, 3, 6)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test.labels.tolist() == [0, 1]  # cat, dog
    first = np.asarray(Image.open(image_folder / "train" / "cat" / "0.png")).transpose(2, 0, 1)
    assert torch.equal(ds.train.images[0], torch.from_numpy(np.ascontiguousarray(first)))
    assert ds.mean == pytest.approx(channel_stats(ds.train.images)[0])


def test_imagefolder_accepts_val_and_refuses_mixed_sizes(image_folder):
    (image_folder / "test").rename(image_folder / "val")
    ds = load_dataset("imagefolder", data_dir=None, val_split=0, split_seed=0, path=str(image_folder))
    assert len(ds.test) == 2
    _image(image_folder / "train" / "dog" / "big.png", (1, 2, 3), size=(7, 5))
    with pytest.raises(DataError, match=r"dog/big.png is 7x5 pixels .* while .*cat/0.png and those before it are 6x6"):
        load_dataset("imagefolder", data_dir=None, val_split=0, split_seed=0, path=str(image_folder))


def test_imagefolder_layout_errors(image_folder):
    with pytest.raises(DataError, match="train/<class>/"):
        load_dataset("imagefolder", data_dir=None, val_split=0, split_seed=0, path=str(image_folder / "nope"))
    (image_folder / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="classes that .* lacks: bird"):
        load_dataset("imagefolder", data_dir=None, val_split=0, split_seed=0, path=str(image_folder))
    (image_folder / "test" / "bird").rmdir()
    for png in (image_folder / "test").rglob("*.png"):
        png.unlink()
    with pytest.raises(DataError, match=r"no images .* in .*test/<class>/: the test split needs at least one"):
        load_dataset("imagefolder", data_dir=None, val_split=0, split_seed=0, path=str(image_folder))


# ---------------------------------------------------------------- npz


def _npz(file: Path, **arrays) -> str:
    good = dict(x_train=np.arange(5 * 16, dtype=np.uint8).reshape(5, 4, 4), y_train=np.array([0, 1, 2, 1, 0]),
                x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.array([2, 0]))
    good.update(arrays)
    np.savez(file, **{k: v for k, v in good.items() if v is not None})
    return str(file)


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    nchw = rng.integers(0, 256, (6, 3, 5, 5), dtype=np.uint8)
    loaded = [load_dataset("npz", data_dir=None, val_split=0, split_seed=0,
                           path=_npz(tmp_path / f"{i}.npz", x_train=x, x_test=x[:2], y_train=np.arange(6) % 4,
                                     y_test=np.array([3, 0], dtype=np.uint8)))
              for i, x in enumerate([nchw, nchw.transpose(0, 2, 3, 1)])]
    for ds in loaded:
        assert (ds.num_classes, ds.channels, ds.image_size) == (4, 3, 5)
        assert torch.equal(ds.train.images, torch.from_numpy(nchw)) and ds.test.labels.tolist() == [3, 0]
    assert loaded[0].mean == pytest.approx(tuple(nchw.mean(axis=(0, 2, 3)) / 255))
    assert loaded[0].std == pytest.approx(tuple(nchw.std(axis=(0, 2, 3)) / 255))
    gray = load_dataset("npz", data_dir=None, val_split=0, split_seed=0, path=_npz(tmp_path / "g.npz"))
    assert gray.train.images.shape == (5, 1, 4, 4) and gray.num_classes == 3


@pytest.mark.parametrize("arrays, message", [
    (dict(x_test=None), "lacks the array.*x_test"),
    (dict(x_train=np.zeros((5, 4, 4), np.float32)), "x_train .* has dtype float32; expected uint8"),
    (dict(y_train=np.zeros(5, np.float64)), "y_train .* has dtype float64; expected integer"),
    (dict(y_train=np.array([0, 1, 2])), r"y_train .* has shape \(3,\); expected \(5,\)"),
    (dict(y_test=np.array([0, -1])), r"y_test .* has labels from -1 to 0; class labels are whole numbers 0..C-1"),
    (dict(y_test=np.array([0, 3])), r"y_test .* has label\(s\) 3 that y_train never has \(its classes are 0..2\)"),
    (dict(y_train=np.array([0, 2, 2, 0, 0])), r"y_train .* no image of class\(es\) 1, yet its largest label 2 "
                                              r"implies 3 classes"),
    (dict(y_train=np.array([0, 1, 2, 1, 2**40], np.uint64)), r"y_train .* labels from 0 to 1099511627776"),
    (dict(y_train=np.eye(3, dtype=np.int64)[[0, 1, 2, 1, 0]]), r"y_train .* shape \(5, 3\).*one-hot"),
    (dict(y_test=np.array([0, np.nan])), "y_test .* dtype float64 \\(it holds NaN\\)"),
    (dict(x_train=np.full((5, 4, 4), np.nan, np.float32)), "x_train .* dtype float32 \\(it holds NaN"),
    (dict(x_test=np.zeros((0, 4, 4), np.uint8), y_test=np.zeros(0, np.int64)), "x_test .* has no images"),
    (dict(x_train=np.zeros((5, 3, 4, 4, 1), np.uint8)), r"x_train .* has shape \(5, 3, 4, 4, 1\)"),
    (dict(x_test=np.zeros((2, 4, 4, 2), np.uint8)), r"x_test .* has shape \(2, 4, 4, 2\)"),
    (dict(x_train=np.zeros((5, 4, 6), np.uint8)), "x_train .* 4x6 .* expected square"),
    (dict(x_test=np.zeros((2, 5, 5), np.uint8)), "x_train and x_test .* differ"),
    (dict(x_train=np.zeros((0, 4, 4), np.uint8), y_train=np.zeros(0, np.int64)), "x_train .* has no images"),
    (dict(y_train=np.array(["a", "b", "c", "d", "e"])), "y_train .* expected integer"),
])
def test_npz_errors_name_the_array(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_dataset("npz", data_dir=None, val_split=0, split_seed=0, path=_npz(tmp_path / "bad.npz", **arrays))


def test_npz_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="none.npz does not exist"):
        load_dataset("npz", data_dir=None, val_split=0, split_seed=0, path=str(tmp_path / "none.npz"))
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match=r"is not an .npz file .* it starts with b'hello'"):
        load_dataset("npz", data_dir=None, val_split=0, split_seed=0, path=str(tmp_path / "text.npz"))
    objects = np.array([np.zeros(2), np.zeros(3)], dtype=object)
    with pytest.raises(DataError, match="y_train .* holds Python objects"):
        load_dataset("npz", data_dir=None, val_split=0, split_seed=0, path=_npz(tmp_path / "o.npz", y_train=objects))
    whole = Path(_npz(tmp_path / "whole.npz")).read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])  # a copy interrupted halfway
    with pytest.raises(DataError, match="cannot read .*cut.npz"):
        load_dataset("npz", data_dir=None, val_split=0, split_seed=0, path=str(tmp_path / "cut.npz"))


def test_a_validation_split_that_takes_a_whole_class_is_refused(tmp_path):
    path = _npz(tmp_path / "few.npz")  # classes 0, 1, 2 with 2, 2 and 1 training images
    with pytest.raises(DataError, match=r"val_split=4 holds out every training image of class\(es\) "):
        load_dataset("npz", data_dir=None, val_split=4, split_seed=0, path=path)
    for seed in range(8, 12):  # one held out image: refused exactly when it is class 2's only one (index 2: seed 10)
        if torch.randperm(5, generator=torch.Generator().manual_seed(seed))[0] == 2:
            with pytest.raises(DataError, match=r"class\(es\) 2, so"):
                load_dataset("npz", data_dir=None, val_split=1, split_seed=seed, path=path)
        else:
            ds = load_dataset("npz", data_dir=None, val_split=1, split_seed=seed, path=path)
            assert sorted(set(ds.train.labels.tolist())) == [0, 1, 2] and len(ds.val) == 1


def test_npz_labels_need_not_be_int64_and_other_arrays_are_ignored(tmp_path):
    ds = load_dataset("npz", data_dir=None, val_split=0, split_seed=0,
                      path=_npz(tmp_path / "u8.npz", y_train=np.array([0, 1, 2, 1, 0], np.uint8), x_val=np.zeros(3)))
    assert ds.train.labels.dtype == torch.int64 and ds.train.labels.tolist() == [0, 1, 2, 1, 0]
    arrays = dict(x_train=np.full((4, 3, 3, 3), 7, np.uint8), y_train=np.array([1, 0, 1, 0], np.int16),
                  x_test=np.zeros((1, 3, 3, 3), np.uint8), y_test=np.array([1], np.int16))
    np.savez_compressed(tmp_path / "zipped.npz", **arrays)  # deflated members read as stored ones
    ds = load_dataset("npz", data_dir=None, val_split=0, split_seed=0, path=str(tmp_path / "zipped.npz"))
    assert (ds.num_classes, ds.channels, ds.image_size) == (2, 3, 3) and int(ds.train.images.sum()) == 7 * 4 * 27


# ---------------------------------------------------------------- augmentation

MEAN, STD = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)


def _batch(n=6, c=3, h=5, w=5, seed=0):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _by_formula(images: torch.Tensor) -> torch.Tensor:
    return (images.double() / 255 - torch.tensor(MEAN).view(1, -1, 1, 1).double()) / torch.tensor(STD).view(1, -1, 1, 1)


def test_normalize_to_float32_within_1e5():
    x = _batch()
    out = normalize(x, MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out.double(), _by_formula(x), atol=1e-5, rtol=0)
    assert torch.equal(BatchAugment(4, False, False, MEAN, STD)(x), out)  # evaluation path
    with pytest.raises(ValueError, match="channels"):
        normalize(x, MEAN[:2], STD[:2])


@pytest.mark.parametrize("flip", [False, True])
def test_pad_crop_flip_matches_hand_computation(flip):
    x, pad = _batch(n=16, c=2, h=4, w=5), 3
    aug = BatchAugment(pad, True, flip, MEAN[:2], STD[:2])
    dy, dx, flipped = aug.sample(16, "cpu", torch.Generator().manual_seed(11))
    out = aug(x, torch.Generator().manual_seed(11))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.is_contiguous()
    for i in range(16):
        padded = F.pad(x[i:i + 1].double(), (pad, pad, pad, pad), mode="reflect")[0]
        crop = padded[:, dy[i]:dy[i] + 4, dx[i]:dx[i] + 5]
        crop = crop.flip(-1) if flipped[i] else crop
        expected = (crop / 255 - torch.tensor(MEAN[:2]).view(-1, 1, 1)) / torch.tensor(STD[:2]).view(-1, 1, 1)
        assert torch.allclose(out[i].double(), expected, atol=1e-5, rtol=0), i
    assert flipped.any() == flip


def test_augment_parameters_cover_their_range_and_are_seeded():
    aug = BatchAugment(4, True, True, MEAN, STD)
    dy, dx, flipped = aug.sample(2000, "cpu", torch.Generator().manual_seed(0))
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(9))
    assert 0.45 < flipped.float().mean().item() < 0.55
    x = _batch(n=32, h=8, w=8)
    assert torch.equal(aug(x, torch.Generator().manual_seed(1)), aug(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(aug(x, torch.Generator().manual_seed(1)), aug(x, torch.Generator().manual_seed(2)))
    assert aug(x).shape == x.shape  # without a generator: torch's default one


def test_flip_only_flips_whole_images():
    x = _batch(n=64)
    aug = BatchAugment(4, False, True, MEAN, STD)
    out = aug(x, torch.Generator().manual_seed(3))
    _, _, flipped = aug.sample(64, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(out[flipped], normalize(x[flipped].flip(-1), MEAN, STD))
    assert torch.equal(out[~flipped], normalize(x[~flipped], MEAN, STD))


def test_reflect_pad_must_be_smaller_than_the_image():
    with pytest.raises(ValueError, match="reflect padding of 4"):
        BatchAugment(4, True, False, MEAN, STD)(_batch(h=4, w=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batch_augment_on_cuda_matches_cpu():
    x, aug = _batch(n=64, h=32, w=32), BatchAugment(4, True, True, MEAN, STD)
    params = aug.sample(64, "cuda", torch.Generator(device="cuda").manual_seed(0))
    out = aug.apply(x.cuda(), *params)
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), aug.apply(x, *(p.cpu() for p in params)), atol=1e-6)


def test_per_sample_transforms_in_a_dataloader():
    split = Split(_batch(n=10, h=8, w=8), torch.arange(10))
    plain = per_sample_transforms(0, False, MEAN, STD, image_size=8)
    assert torch.allclose(plain(split.images[3]), normalize(split.images[3:4], MEAN, STD)[0], atol=1e-6)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        TransformedSplit(split, per_sample_transforms(2, True, MEAN, STD, image_size=8)), batch_size=4)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3] and len(loader.dataset) == 10


# ---------------------------------------------------------------- batches


def _indexed_split(n: int) -> Split:
    """Image i is filled with i, label i is i: batches show which samples they hold."""
    return Split(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(), torch.arange(n))


def test_batches_cover_the_epoch_once():
    split = _indexed_split(10)
    iterator = BatchIterator(split, 4, epoch_generator(0, 0, "cpu"))
    batches = list(iterator)
    assert len(iterator) == 3 and [len(labels) for _, labels in batches] == [4, 4, 2]
    seen = torch.cat([labels for _, labels in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(images[:, 0, 0, 0].long(), labels) for images, labels in batches)
    dropped = BatchIterator(split, 4, epoch_generator(0, 0, "cpu"), drop_last=True)
    assert len(dropped) == 2 and [len(labels) for _, labels in dropped] == [4, 4]


def test_epoch_order_depends_only_on_seed_and_epoch_and_resumes():
    split = _indexed_split(100)

    def order(seed, epoch, start=0):
        batches = BatchIterator(split, 16, epoch_generator(seed, epoch, "cpu"), start=start)
        return [labels.tolist() for _, labels in batches]

    assert order(3, 5) == order(3, 5) and order(3, 5) != order(3, 6) and order(3, 5) != order(4, 5)
    resumed = BatchIterator(split, 16, epoch_generator(3, 5, "cpu"), start=4)
    assert len(resumed) == 3 and order(3, 5, start=4) == order(3, 5)[4:]
    assert list(resumed) and len(list(resumed)) == 3  # iterating again gives the batches again
    with pytest.raises(ValueError, match="start=8"):
        BatchIterator(split, 16, epoch_generator(3, 5, "cpu"), start=8)


def test_split_checks_its_layout():
    with pytest.raises(ValueError, match="uint8"):
        Split(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
