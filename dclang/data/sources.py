"""Readers for each dataset in the catalogue, and `load_dataset`, which dispatches to them.

Each reader returns the official (train, test) splits as uint8 tensors; `load_dataset` then
carves the seeded validation split out of train. torchvision, scikit-learn and PIL are
imported inside the reader that needs them, so loading CIFAR never pays for scikit-learn;
torchvision through `import_library`, so a torchvision built for another torch is an error
naming both versions, not a traceback.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from dclang.data.catalog import DATASETS, DataError, default_data_dir
from dclang.data.dataset import Dataset, Split, carve_validation, channel_stats
from dclang.diagnostics import not_a_file, not_a_folder

# The usual published statistics of each official training set; their own data for the rest.
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_TINYIMAGENET_STATS = ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))

#: the file name endings torchvision's ImageFolder accepts; other files (notes, thumbnails) are skipped
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: digits has no official test split: this fixed seed carves one, whatever `split_seed` is
DIGITS_TEST_SEED = 0
DIGITS_TEST_FRACTION = 0.2


class _Official(NamedTuple):
    """What a reader returns: the official splits plus what only the reader knows."""

    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...] | None  # None: computed from the official train split
    std: tuple[float, ...] | None


def load_dataset(name: str, *, data_dir: str | Path | None, val_split: int | float, split_seed: int,
                 download: bool = True, path: str | None = None) -> Dataset:
    """Load dataset `name` (a key of `DATASETS`) with a validation split carved out of train.

    `data_dir` holds the downloadable datasets (None: `default_data_dir()`); `path` is the
    user's file or folder for `imagefolder` and `npz` and is refused for the others, so a
    misplaced data `path` is not silently ignored. `download=False` never touches the network.
    Problems with the files are raised as `DataError`.
    """
    if name not in _READERS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    if name in _PATH_READERS:
        if path is None:
            raise DataError(f"dataset {name!r} reads your own data: give its location with `path = \"...\"` in the "
                            f"data block ({DATASETS[name].description})")
        official = _PATH_READERS[name](Path(path).expanduser())
    else:
        if path is not None:
            raise DataError(f"the data block's `path` is only used by the imagefolder and npz datasets, not {name!r}; "
                            f"use --data-dir to say where {name} is stored")
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        official = _DIR_READERS[name](root, download)
    train, val = carve_validation(official.train, val_split, split_seed, official.num_classes)
    mean, std = (official.mean, official.std) if official.mean is not None else channel_stats(official.train.images)
    _, channels, height, _ = official.train.images.shape
    return Dataset(name=name, num_classes=official.num_classes, channels=channels, image_size=height,
                   mean=mean, std=std, train=train, val=val, test=official.test)


def _split(images: np.ndarray, labels: np.ndarray | list[int]) -> Split:
    """A Split from NCHW uint8 images and integer labels (copied to contiguous tensors)."""
    return Split(torch.from_numpy(np.ascontiguousarray(images)),
                 torch.as_tensor(np.asarray(labels), dtype=torch.int64))


# ---------------------------------------------------------------- digits


def _read_digits(root: Path, download: bool) -> _Official:
    """scikit-learn's 8x8 digits (values 0..16, scaled to uint8 as round(v * 255 / 16)).

    It has no official test split, so a stratified 20% (360 images) is carved with the fixed
    seed `DIGITS_TEST_SEED` by scikit-learn's `train_test_split`, whose NumPy legacy RNG is
    frozen: the test set is the same in every run and every study. `root` and `download` are
    unused: the data ships inside scikit-learn.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target
    pool, test = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
                                  random_state=DIGITS_TEST_SEED, stratify=labels)
    pool.sort()
    test.sort()
    return _Official(_split(images[pool], labels[pool]), _split(images[test], labels[test]), 10, None, None)


# ---------------------------------------------------------------- CIFAR


def _read_cifar(root: Path, download: bool, *, title: str, tv_class_name: str, num_classes: int,
                stats: tuple[tuple[float, ...], tuple[float, ...]]) -> _Official:
    """CIFAR-10/100 from the official python pickles, downloading them if allowed.

    torchvision only downloads and extracts (its own URL and archive checksum). The pickles
    are then read here, in the format torchvision's CIFAR10 reads (`pickle.load(...,
    encoding="latin1")`, rows of 3072 bytes = R, G, B planes of 32x32), rather than through
    the torchvision dataset object: that object refuses any file whose md5 differs from the
    official one, and these readers must also accept re-pickled or test copies. The shapes,
    dtypes and label ranges are checked instead, so a damaged file is still refused.
    """
    from dclang.models.library import import_library

    tv = getattr(import_library("torchvision.datasets"), tv_class_name)
    folder = root / tv.base_folder
    expected = [name for name, _md5 in tv.train_list + tv.test_list]
    _refuse_odd_files([folder / name for name in expected])
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing and download:
        download_and_extract_archive = import_library("torchvision.datasets.utils").download_and_extract_archive
        try:
            download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
        except Exception as exc:  # network, disk or checksum: all end in the same advice
            why = f"downloading {tv.url} failed: {exc}"
            raise DataError(_cifar_missing(title, tv, root, folder, missing, why)) from exc
        missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        why = "the download is switched off" if not download else "the downloaded archive lacks them"
        raise DataError(_cifar_missing(title, tv, root, folder, missing, why))

    def read(names: list[str]) -> Split:
        data, labels = [], []
        for name in names:
            batch_data, batch_labels = _read_cifar_batch(folder / name, num_classes)
            data.append(batch_data)
            labels.extend(batch_labels)
        return _split(np.concatenate(data).reshape(-1, 3, 32, 32), labels)

    return _Official(read([n for n, _ in tv.train_list]), read([n for n, _ in tv.test_list]),
                     num_classes, *stats)


def _read_cifar_batch(file: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """One CIFAR pickle: (uint8 rows of 3072, labels). Keys may be str (as the official files
    read with latin1) or bytes (as pickled by Python 3 code following the CIFAR web page)."""
    try:
        with open(file, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    except Exception as exc:  # unpickling a damaged file can raise almost anything
        raise DataError(f"{file} is not a readable CIFAR batch ({exc}); delete it and download or "
                        f"extract the archive again") from exc
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
            or labels is None or len(labels) != data.shape[0]
            or not all(0 <= int(y) < num_classes for y in labels)):
        raise DataError(f"{file} is not a CIFAR batch: expected 'data' uint8 of shape (N, 3072) and "
                        f"'labels' (or 'fine_labels') of N ints in [0, {num_classes}); delete it and "
                        f"download or extract the archive again")
    return data, [int(y) for y in labels]


def _refuse_odd_files(files: list[Path]) -> None:
    """A file a reader needs that exists but is no regular file (a folder, a device): said so,
    where "not found" would send the user looking for a file that is there."""
    for file in files:
        problem = not_a_file(file)
        if problem is not None and os.path.lexists(file):
            raise DataError(f"{file} {problem}; it should be the file of that name from the dataset's archive: "
                            f"move it away and extract the archive again")


def _cifar_missing(title: str, tv: type, root: Path, folder: Path, missing: list[str], why: str) -> str:
    wanted = ", ".join(name for name, _md5 in tv.train_list + tv.test_list)
    return (f"{title} not found: looked in {root} for the folder {tv.base_folder}/ with the files "
            f"{wanted}; missing in {folder}: {', '.join(missing)} ({why}). Fix: pass --data-dir DIR where "
            f"DIR contains {tv.base_folder}/ (or set $DCLANG_DATA), or download {tv.url} and extract it "
            f"into {root}")


# ---------------------------------------------------------------- image files


def _is_image(file: Path) -> bool:
    return file.is_file() and not file.name.startswith(".") and file.suffix.lower() in _IMAGE_SUFFIXES


def _read_images(files: list[Path], size: tuple[int, int] | None) -> np.ndarray:
    """Decode `files` (at least one) as RGB, grayscale converted, into one uint8 (N, 3, H, W) array.

    All images must have one square size: `size` as (width, height) if given, else the first
    image's. The first file that differs is named in the DataError. Decoding runs in threads
    because PIL releases the GIL while decoding, which matters for Tiny ImageNet's 110000 JPEGs.
    """
    from PIL import Image

    def decode(file: Path) -> np.ndarray:
        try:
            with Image.open(file) as image:
                return np.asarray(image.convert("RGB"))
        except OSError as exc:  # PIL's UnidentifiedImageError is an OSError too
            raise DataError(f"cannot read image {file}: {exc}") from exc

    out = None
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for i, (file, pixels) in enumerate(zip(files, pool.map(decode, files))):
            height, width, _ = pixels.shape
            if out is None:
                if size is not None and (width, height) != size:
                    raise DataError(f"{file} is {width}x{height} pixels (width x height), expected "
                                    f"{size[0]}x{size[1]}")
                if width != height:
                    raise DataError(f"{file} is {width}x{height} pixels (width x height): images must be "
                                    f"square; crop or resize them beforehand")
                out = np.empty((len(files), 3, height, width), dtype=np.uint8)
                first = file
            elif pixels.shape[:2] != out.shape[2:]:
                raise DataError(f"all images must have the same size, but {file} is {width}x{height} pixels "
                                f"(width x height) while {first} and those before it are "
                                f"{out.shape[3]}x{out.shape[2]}; resize them beforehand")
            out[i] = pixels.transpose(2, 0, 1)
    finally:
        pool.shutdown(cancel_futures=True)
    return out


def _read_tinyimagenet(root: Path, download: bool) -> _Official:
    """The official `tiny-imagenet-200/` layout; its labelled `val/` is our test split.

    Labels follow the order of `wnids.txt`. There is no torchvision downloader for it, so
    `download` is not used: the DataError says where to get and put the archive.
    """
    folder = root / "tiny-imagenet-200"
    wnids_file = folder / "wnids.txt"
    annotations = folder / "val" / "val_annotations.txt"
    _refuse_odd_files([wnids_file, annotations])
    for needed in (wnids_file, annotations):
        if not needed.is_file():
            raise DataError(
                f"Tiny ImageNet not found: looked in {root} for the folder tiny-imagenet-200/ with wnids.txt, "
                f"train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt; {needed} is "
                f"missing. Fix: download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into "
                f"{root}, or pass --data-dir DIR where DIR contains tiny-imagenet-200/ (or set $DCLANG_DATA)")
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    label_of = {wnid: i for i, wnid in enumerate(wnids)}

    train_files, train_labels = [], []
    for wnid, label in label_of.items():
        files = sorted(f for f in (folder / "train" / wnid / "images").glob("*") if _is_image(f))
        if not files:
            raise DataError(f"no training images in {folder / 'train' / wnid / 'images'} for class {wnid} "
                            f"listed in {wnids_file}")
        train_files += files
        train_labels += [label] * len(files)

    test_files, test_labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise DataError(f"{annotations} line {number}: expected 'filename<TAB>wnid<TAB>...' with a wnid "
                            f"from {wnids_file}, got {line!r}")
        test_files.append(folder / "val" / "images" / fields[0])
        test_labels.append(label_of[fields[1]])

    if not test_files:
        raise DataError(f"{annotations} lists no images: the test split (Tiny ImageNet's val/) needs at least one; "
                        f"unzip tiny-imagenet-200.zip again")
    images = _read_images(train_files + test_files, size=(64, 64))
    n = len(train_files)
    return _Official(_split(images[:n], train_labels), _split(images[n:], test_labels), len(wnids),
                     *_TINYIMAGENET_STATS)


def _read_imagefolder(path: Path) -> _Official:
    """`path/train/<class>/*` and `path/test/<class>/*` (or `path/val/` when there is no test/).

    Classes are the sorted subfolders of train/; the test split may lack some of them but may
    not add new ones. Images are read as RGB and must all have one square size.
    """
    problem = not_a_folder(path)
    if problem is not None:
        raise DataError(f"imagefolder: {path} {problem}; the data block's `path` must name a folder holding "
                        f"train/<class>/ and test/<class>/ (or val/) folders of images")
    train_dir = path / "train"
    test_dir = path / "test" if (path / "test").is_dir() else path / "val"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DataError(f"imagefolder: expected {path}/train/<class>/ and {path}/test/<class>/ (or val/) "
                        f"folders of images; {train_dir if not train_dir.is_dir() else test_dir} is not a folder")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder: {train_dir} has no class subfolders; put each class's images in "
                        f"{train_dir}/<class>/")
    unknown = sorted(d.name for d in test_dir.iterdir()
                     if d.is_dir() and not d.name.startswith(".") and d.name not in classes)
    if unknown:
        raise DataError(f"imagefolder: {test_dir} has classes that {train_dir} lacks: {', '.join(unknown)}")

    def listing(split_dir: Path, require_each: bool) -> tuple[list[Path], list[int]]:
        files, labels = [], []
        for label, name in enumerate(classes):
            found = sorted(f for f in (split_dir / name).glob("*") if _is_image(f))
            if require_each and not found:
                raise DataError(f"imagefolder: no images ({', '.join(_IMAGE_SUFFIXES)}) in {split_dir / name}")
            files += found
            labels += [label] * len(found)
        return files, labels

    train_files, train_labels = listing(train_dir, require_each=True)
    test_files, test_labels = listing(test_dir, require_each=False)
    if not test_files:
        raise DataError(f"imagefolder: no images ({', '.join(_IMAGE_SUFFIXES)}) in {test_dir}/<class>/: the test "
                        f"split needs at least one")
    images = _read_images(train_files + test_files, size=None)
    n = len(train_files)
    return _Official(_split(images[:n], train_labels), _split(images[n:], test_labels), len(classes), None, None)


# ---------------------------------------------------------------- npz


def _read_npz(path: Path) -> _Official:
    """An .npz with x_train, y_train, x_test, y_test, checked whole before any training.

    The rules, each refused with the array and the file it broke (docs/language.md states
    them for users): x_* are uint8 images, (N, H, W), (N, H, W, C) or (N, C, H, W) with
    C = 1 or 3 (`npz_images`), square, one shape in both; y_* are integer labels of shape
    (N,), one per image; neither split is empty. The class count is max(y_train) + 1, every
    class from 0 to it has a training image (a gap would be an output never trained), and
    y_test holds only those classes. Other arrays in the file are ignored.
    """
    problem = not_a_file(path)
    if problem is not None:
        raise DataError(f"npz: {path} {problem}; the data block's `path` must name an .npz file with arrays x_train, "
                        f"y_train, x_test, y_test")
    arrays = _npz_arrays(path)

    x_train, x_test = npz_images(path, "x_train", arrays["x_train"]), npz_images(path, "x_test", arrays["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"npz: x_train and x_test in {path} differ in (channels, height, width): "
                        f"{x_train.shape[1:]} vs {x_test.shape[1:]}")
    y_train = _npz_labels(path, "y_train", arrays["y_train"], len(x_train), "x_train")
    y_test = _npz_labels(path, "y_test", arrays["y_test"], len(x_test), "x_test")
    num_classes = int(y_train.max()) + 1
    unseen = np.setdiff1d(np.arange(num_classes), y_train)
    if unseen.size:
        raise DataError(f"npz: y_train in {path} has no image of class(es) {_listed(unseen)}, yet its largest label "
                        f"{num_classes - 1} implies {num_classes} classes (0..{num_classes - 1}): renumber the "
                        f"labels 0..C-1 (np.unique(y, return_inverse=True) does) or add images of those classes")
    strange = np.setdiff1d(y_test, y_train)
    if strange.size:
        raise DataError(f"npz: y_test in {path} has label(s) {_listed(strange)} that y_train never has (its classes "
                        f"are 0..{num_classes - 1}): a model cannot learn a class it never trains on")
    return _Official(_split(x_train, y_train), _split(x_test, y_test), num_classes, None, None)


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of an .npz, each refused before it is read when its header says it
    holds Python objects (never unpickled) or more bytes than the file has (a damaged or
    hostile header would otherwise allocate that much: 58 TiB for a shape of 10^12 images)."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            head = file.read(8)
        if head.startswith(b"PK"):
            raise DataError(f"npz: cannot read {path}: it starts as a zip archive but its end is missing (truncated "
                            f"or damaged); write it again with np.savez")
        raise DataError(f"npz: {path} is not an .npz file (a zip archive of .npy arrays, as np.savez writes); it "
                        f"starts with {head!r}")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            missing = [k for k in _NPZ_KEYS if k not in members]
            if missing:
                raise DataError(f"npz: {path} lacks the array(s) {', '.join(missing)}; it has "
                                f"{', '.join(members) or 'none'}, and needs {', '.join(_NPZ_KEYS)}")
            arrays = {}
            for key in _NPZ_KEYS:
                with archive.open(members[key]) as file:
                    _npz_header(path, key, file, members[key].file_size)
                with archive.open(members[key]) as file:
                    arrays[key] = np.lib.format.read_array(file, allow_pickle=False)
            return arrays
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # a damaged zip or .npy
        raise DataError(f"npz: cannot read {path} as an .npz of plain arrays: {exc}") from exc
    except MemoryError as exc:
        raise DataError(f"npz: {path} does not fit in this machine's memory ({exc})") from exc


def _npz_header(path: Path, key: str, file, size: int) -> None:
    """Check one .npy member's header against what it may hold and the bytes it has."""
    version = np.lib.format.read_magic(file)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read_header(file)
    if dtype.hasobject:
        raise DataError(f"npz: {key} in {path} holds Python objects (dtype {dtype}), which dclang never unpickles; "
                        f"store numbers: uint8 images and integer labels")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held = size - file.tell()
    if declared > held:
        raise DataError(f"npz: {key} in {path} declares shape {shape} of {dtype} ({declared:,} bytes) but holds "
                        f"{held:,}: the file is truncated or damaged")


def _listed(values: np.ndarray, most: int = 8) -> str:
    shown = ", ".join(str(int(v)) for v in values[:most])
    return shown + (f" and {values.size - most} more" if values.size > most else "")


def npz_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """x as uint8 NCHW from (N, H, W) grayscale, (N, H, W, C) or (N, C, H, W) with C in {1, 3}.

    A 4-D array is NHWC when its last dimension is 1 or 3 and its second is not, else NCHW.
    """
    if x.dtype != np.uint8:
        nan = " (it holds NaN: replace those pixels first)" if x.dtype.kind in "fc" and np.isnan(x).any() else ""
        raise DataError(f"npz: {key} in {path} has dtype {x.dtype}{nan}; expected uint8 pixels 0..255 "
                        f"(convert with np.clip(x, 0, 255).astype(np.uint8), scaling [0, 1] floats by 255 first)")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"npz: {key} in {path} has shape {x.shape}; expected (N, H, W), (N, H, W, C) or "
                        f"(N, C, H, W) with C = 1 or 3")
    if x.shape[0] == 0:
        raise DataError(f"npz: {key} in {path} has no images (shape {x.shape}); every split needs at least one")
    if x.shape[2] != x.shape[3]:
        raise DataError(f"npz: {key} in {path} holds {x.shape[2]}x{x.shape[3]} (height x width) images; "
                        f"expected square images")
    return x


def _npz_labels(path: Path, key: str, y: np.ndarray, n: int, x_key: str) -> np.ndarray:
    """y as int64, after its dtype, shape and range: one integer in [0, 2**31) per image."""
    if not np.issubdtype(y.dtype, np.integer):
        nan = " (it holds NaN)" if y.dtype.kind in "fc" and np.isnan(y).any() else ""
        raise DataError(f"npz: {key} in {path} has dtype {y.dtype}{nan}; expected integer class labels 0..C-1")
    if y.ndim != 1 or len(y) != n:
        one_hot = " (if it is one-hot, store y.argmax(1))" if y.ndim == 2 and len(y) == n else ""
        raise DataError(f"npz: {key} in {path} has shape {y.shape}; expected ({n},), one label per image "
                        f"of {x_key}{one_hot}")
    if y.min() < 0 or y.max() >= 2**31:
        raise DataError(f"npz: {key} in {path} has labels from {int(y.min())} to {int(y.max())}; class labels "
                        f"are whole numbers 0..C-1")
    return y.astype(np.int64)


_DIR_READERS: dict[str, Callable[[Path, bool], _Official]] = {
    "digits": _read_digits,
    "cifar10": partial(_read_cifar, title="CIFAR-10", tv_class_name="CIFAR10", num_classes=10,
                       stats=_CIFAR10_STATS),
    "cifar100": partial(_read_cifar, title="CIFAR-100", tv_class_name="CIFAR100", num_classes=100,
                        stats=_CIFAR100_STATS),
    "tinyimagenet": _read_tinyimagenet,
}
_PATH_READERS: dict[str, Callable[[Path], _Official]] = {"imagefolder": _read_imagefolder, "npz": _read_npz}
_READERS = {**_DIR_READERS, **_PATH_READERS}
