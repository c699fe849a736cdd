"""A user's own images, in the layouts people keep them, read into a :class:`~core.data.Dataset` with no bias labels.

Layouts (:func:`find_layout` tells which one a path is):

- **ImageFolder** (torchvision): ``PATH/train/<class>/*``, optional ``PATH/val/`` (or ``valid/``, ``validation/``)
  and ``PATH/test/``, each by class. A folder of class folders alone is the training split.
- **Hugging Face imagefolder**: the same, plus ``metadata.csv`` or ``metadata.jsonl`` (in ``PATH`` or a split's
  folder) with a ``file_name`` column relative to it; its ``label`` column, where there is one, names the class
  instead of the folder, and its ``attribute`` column gives the bias attribute.
- **A CSV manifest** ``file,label[,split][,attribute]``, paths relative to the CSV: what ``diffinject export``
  writes, so an export reads back in.

Classes are the sorted class names (numerically where every name is a number), as torchvision sorts them. Every
image is read with Pillow (PNG, JPEG, WebP, BMP, TIFF; grey, RGB or RGBA with alpha flattened onto white), its
shorter side resized to ``image_size`` and centre-cropped to a square (torchvision's ``Resize`` then
``CenterCrop``), and kept as uint8: the set is one (N, C, S, S) tensor, grey (C = 1) only if every image is grey.
Files without an image suffix are ignored, as torchvision does; an image that cannot be read is refused by name, or
skipped and counted with ``skip_unreadable``. Symbolic links are followed.

Without a validation split a stratified, seeded share of the training images becomes one; without a test split the
validation split stands in. The dataset's ``about`` says so (``notes``), with the layout and the attribute values.

Bias attributes are optional and for evaluation only: a manifest's ``attribute`` column, or ``attributes`` (a CSV
``file,attribute``, paths relative to ``PATH``). They may cover any part of any split; an image without one has
bias -1. No method, miner or U-Net reads them (``tests/test_pipeline.py::test_bias_labels_are_never_read``).
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import DataError, Dataset, ImageSet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SPLIT_NAMES = {"train": ("train", "training"), "valid": ("val", "valid", "validation"), "test": ("test", "testing")}
METADATA = ("metadata.csv", "metadata.jsonl")
DEFAULT_IMAGE_SIZE = 32  # a --data run's images without --image-size: the size the project's models are tuned for
BACKGROUND = (255, 255, 255)  # where alpha is flattened


@dataclass
class Entry:
    """One image of the data: its file, class name, split (None: not said) and bias attribute (None: unknown)."""

    path: Path
    label: str
    split: str | None = None
    attribute: str | None = None


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def walk_images(folder: Path) -> list[Path]:
    """Every image file below ``folder``, following symbolic links, hidden folders skipped, sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files if is_image(Path(f))]
    return sorted(found)


def _split_folder(path: Path, split: str) -> Path | None:
    return next((path / n for n in SPLIT_NAMES[split] if (path / n).is_dir()), None)


def find_layout(path: str | Path) -> str:
    """``csv`` (a manifest file), ``huggingface`` (a folder with a metadata file), ``imagefolder`` (a folder of
    split or class folders); a one-line :class:`DataError` naming the path when it is none of them."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise DataError(f"--data {path} is a file but not a CSV manifest (file,label[,split][,attribute])")
    if not path.is_dir():
        raise DataError(f"--data {path} does not exist")
    released = sorted(p for p in path.glob("*pct") if (p / "align").is_dir())
    if released:  # bias labels in every file name: the benchmark loader reads those, for evaluation only
        raise DataError(f"--data {path} is a released benchmark copy ({released[0].name}/align/...): run it with "
                        f"--dataset {path.name} --data-root {path.parent} --ratio R")
    folders = [path] + [f for s in SPLIT_NAMES for f in [_split_folder(path, s)] if f is not None]
    if any((f / m).is_file() for f in folders for m in METADATA):
        return "huggingface"
    if not any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        raise DataError(f"--data {path} holds no folders: expected train/<class>/ (or <class>/) folders of images, "
                        "or give a CSV manifest")
    return "imagefolder"


# ---------------------------------------------------------------------------------------------------------
# listing the entries of each layout
# ---------------------------------------------------------------------------------------------------------


def _class_entries(folder: Path, split: str | None) -> list[Entry]:
    """``folder/<class>/**/image`` as entries; a class folder without images is refused by name."""
    entries = []
    for cls in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        files = walk_images(cls)
        if not files:
            raise DataError(f"class folder {cls} has no images ({', '.join(IMAGE_SUFFIXES)})")
        entries += [Entry(f, cls.name, split) for f in files]
    if not entries:
        raise DataError(f"{folder} has no class folders of images")
    return entries


def _imagefolder(path: Path) -> list[Entry]:
    if _split_folder(path, "train") is None:  # a folder of class folders: all of it is training data
        return _class_entries(path, "train")
    return [e for split in SPLIT_NAMES if (f := _split_folder(path, split)) is not None
            for e in _class_entries(f, split)]


def _read_table(file: Path) -> list[dict]:
    """The rows of a CSV (with a header) or JSON Lines file, as dicts of strings."""
    try:
        if file.suffix == ".jsonl":
            return [{k: None if v is None else str(v) for k, v in json.loads(line).items()}
                    for line in file.read_text().splitlines() if line.strip()]
        with open(file, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {file}: {(str(e).splitlines() or [''])[0]}") from None


def _huggingface(path: Path) -> list[Entry]:
    """Class folders as in ImageFolder, each image's row of a metadata file (``file_name``) adding its label and
    attribute; a metadata file at ``PATH`` may also name files below the split folders."""
    by_file: dict[Path, dict] = {}
    for folder in [path] + [f for s in SPLIT_NAMES for f in [_split_folder(path, s)] if f is not None]:
        for name in METADATA:
            if (folder / name).is_file():
                for row in _read_table(folder / name):
                    if not row.get("file_name"):
                        raise DataError(f"{folder / name} has a row without file_name (Hugging Face's imagefolder "
                                        "metadata names each image in a file_name column)")
                    by_file[(folder / row["file_name"]).resolve()] = row
    try:
        entries = _imagefolder(path)
    except DataError:  # no class folders: every image's class must come from its metadata row
        entries = [Entry(f, "", next((s for s in SPLIT_NAMES if f.relative_to(path).parts[0] in SPLIT_NAMES[s]),
                                     "train")) for f in walk_images(path)]
    for e in entries:
        row = by_file.get(e.path.resolve(), {})
        e.label = row.get("label") or e.label
        e.attribute = row.get("attribute") or None
        if not e.label:
            raise DataError(f"{e.path} has no class: no class folder and no label in its metadata row")
    missing = set(by_file) - {e.path.resolve() for e in entries}
    if missing:
        raise DataError(f"metadata names {len(missing)} file(s) that are not images of the folder, e.g. "
                        f"{sorted(missing)[0]}")
    return entries


def _manifest(file: Path) -> list[Entry]:
    rows = _read_table(file)
    if not rows:
        raise DataError(f"manifest {file} has no rows")
    for column in ("file", "label"):
        if column not in rows[0]:
            raise DataError(f"manifest {file} has no {column!r} column (expected file,label[,split][,attribute])")
    entries = []
    for i, row in enumerate(rows, start=2):  # line numbers as an editor shows them, after the header
        image = file.parent / (row["file"] or "")
        if not row["file"] or not image.is_file():
            raise DataError(f"manifest {file}, line {i}: no image at {image}")
        split = (row.get("split") or "").strip().lower() or None
        if split is not None:
            split = next((s for s, names in SPLIT_NAMES.items() if split in names), None)
            if split is None:
                raise DataError(f"manifest {file}, line {i}: unknown split {row['split']!r} (train, val or test)")
        if not row["label"]:
            raise DataError(f"manifest {file}, line {i}: no label")
        entries.append(Entry(image, row["label"], split or "train", row.get("attribute") or None))
    return entries


def _attribute_file(file: Path, root: Path) -> dict[Path, str]:
    """``--attributes FILE.csv`` (``file,attribute``, paths relative to the data's folder): resolved path ->
    attribute."""
    rows = _read_table(file)
    if not rows or "file" not in rows[0] or "attribute" not in rows[0]:
        raise DataError(f"attributes {file} must be a CSV with the columns file,attribute")
    return {(root / r["file"]).resolve(): r["attribute"] for r in rows if r.get("file") and r.get("attribute")}


# ---------------------------------------------------------------------------------------------------------
# reading images
# ---------------------------------------------------------------------------------------------------------


def to_square(image: Image.Image, size: int) -> Image.Image:
    """Alpha flattened onto white, grey kept grey and anything else RGB; the shorter side resized to ``size``
    (bilinear, antialiased) and the centre cropped to ``size`` x ``size``."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, BACKGROUND)
        image.paste(rgba, mask=rgba.getchannel("A"))
    elif image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode in ("1", "I", "I;16", "F") else "RGB")
    w, h = image.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def read_image(path: Path, size: int) -> np.ndarray:
    """One image as uint8 (C, size, size), C = 1 (grey) or 3; Pillow's errors (a decompression bomb included) as
    they come."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # past Pillow's limit: refuse, never decode
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at the smallest scale still >= size
            array = np.array(to_square(image, size), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def read_images(paths: list[Path], size: int, skip_unreadable: bool = False, progress: bool = True):
    """``paths`` as one uint8 tensor (N, C, size, size) without a float copy, and the indices of those read (all
    unless ``skip_unreadable`` dropped some)."""
    from tqdm.auto import tqdm

    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    kept, grey = [], True
    for i, path in enumerate(tqdm(paths, desc="images", disable=not progress, dynamic_ncols=True, leave=False)):
        try:
            array = read_image(path, size)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(f"{path} is too large to decode safely ({e})") from None
        except (OSError, ValueError, SyntaxError) as e:  # not an image, truncated, unknown format
            if skip_unreadable:
                continue
            raise DataError(f"cannot read image {path}: {(str(e).splitlines() or [''])[0]} (skip such files with "
                            "--skip-unreadable)") from None
        images[len(kept)] = torch.from_numpy(array)  # a grey image fills all three channels
        grey &= array.shape[0] == 1
        kept.append(i)
    images = images[: len(kept)]
    return (images[:, :1].clone() if grey else images), kept


# ---------------------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------------------


def _sorted_names(names) -> list[str]:
    names = sorted(set(names))
    return sorted(names, key=float) if all(_is_number(n) for n in names) else names


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def carve(labels: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """A stratified, seeded validation share of a training split: the indices (sorted) of ``round(share * n_c)``
    images of each class (at least one of a class with two or more)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels.numpy() == c)
        take = min(len(idx) - 1, max(1, round(share * len(idx)))) if len(idx) >= 2 else 0
        chosen += rng.permutation(idx)[:take].tolist()
    return torch.tensor(sorted(chosen), dtype=torch.long)


def data_name(path: str | Path) -> str:
    """What a run calls your data: its folder's name, or its manifest's without the suffix."""
    path = Path(path)
    return (path.stem if path.suffix.lower() == ".csv" else path.resolve().name) or "data"


def load_folder(path: str | Path, image_size: int | None = None, attributes: str | Path | None = None,
                valid_share: float = 0.1, data_seed: int = 0, skip_unreadable: bool = False,
                progress: bool = True) -> Dataset:
    """A user's images at ``path`` (any layout of this module) as a :class:`~core.data.Dataset` with its class
    names and ``about``: ``layout``, ``attributes`` (the bias attribute values by index, empty when none are known)
    and ``notes``."""
    path = Path(path)
    layout = find_layout(path)
    entries = {"csv": _manifest, "huggingface": _huggingface, "imagefolder": _imagefolder}[layout](path)
    root = path.parent if layout == "csv" else path
    if attributes is not None:
        given = _attribute_file(Path(attributes), root)
        for e in entries:
            e.attribute = given.get(e.path.resolve(), e.attribute)
    classes = _sorted_names(e.label for e in entries if e.split == "train")
    if len(classes) < 2:
        raise DataError(f"--data {path} has {len(classes)} class in its training split: a classifier needs two or "
                        "more")
    strays = sorted({e.label for e in entries} - set(classes))
    if strays:
        raise DataError(f"--data {path}: class {strays[0]!r} is in a validation or test split but not in train")
    values = _sorted_names(e.attribute for e in entries if e.attribute is not None)
    size = image_size or DEFAULT_IMAGE_SIZE
    images, kept = read_images([e.path for e in entries], size, skip_unreadable, progress)
    notes = []
    if len(kept) < len(entries):
        notes.append(f"{len(entries) - len(kept)} unreadable image(s) skipped (--skip-unreadable)")
        entries = [entries[i] for i in kept]
    labels = torch.tensor([classes.index(e.label) for e in entries], dtype=torch.long)
    bias = torch.tensor([values.index(e.attribute) if e.attribute is not None else -1 for e in entries],
                        dtype=torch.long)
    split_of = np.array([e.split for e in entries])
    sets = {s: ImageSet(images[idx], labels[idx], bias[idx])
            for s in SPLIT_NAMES for idx in [torch.from_numpy(np.flatnonzero(split_of == s))] if len(idx)}
    if "train" not in sets:
        raise DataError(f"--data {path} has no training images")
    if "valid" not in sets:
        held = carve(sets["train"].labels, valid_share, data_seed)
        keep = torch.ones(len(sets["train"]), dtype=torch.bool)
        keep[held] = False
        sets["valid"], sets["train"] = sets["train"].subset(held), sets["train"].subset(torch.nonzero(keep)[:, 0])
        notes.append(f"no validation split: {len(held)} training images ({valid_share:.0%}, stratified by class, "
                     f"data seed {data_seed}) became one")
    if "test" not in sets:
        sets["test"] = sets["valid"]
        notes.append("no test split: results are on the validation split, which also chose each classifier's "
                     "checkpoint (optimistic)")
    return Dataset(data_name(path), sets["train"], sets["valid"], sets["test"], len(classes), classes=classes,
                   about={"layout": layout, "attributes": values, "notes": notes})
