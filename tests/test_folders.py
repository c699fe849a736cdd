"""A user's own images (core/folders.py): each layout, each image kind, splits carved or standing in, attributes for
evaluation only, and every bad input refused in one line naming its path."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffinject.core.data import DataError
from diffinject.core.folders import carve, find_layout, load_folder, read_image


def _image(kind: str, size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    if kind == "grey":
        return Image.fromarray(rgb[..., 0])
    if kind == "rgba":
        return Image.fromarray(np.concatenate([rgb, np.full_like(rgb[..., :1], 128)], 2), "RGBA")
    return Image.fromarray(rgb)


def write_folder(root: Path, splits=("train", "val", "test"), classes=("cat", "dog"), n=6, kind="rgb",
                 suffix=".png") -> Path:
    """``root/<split>/<class>/<i><suffix>``: ``n`` images of mixed sizes per class and split."""
    for split in splits:
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                _image(kind, (30 + 3 * i, 28 + i), seed=zlib.crc32(f'{split}{c}{i}'.encode())).save(folder / f"{i}{suffix}")
    return root


@pytest.mark.parametrize("kind, suffix, channels", [("rgb", ".png", 3), ("rgb", ".jpg", 3), ("grey", ".png", 1),
                                                    ("rgba", ".webp", 3), ("grey", ".bmp", 1), ("rgb", ".tiff", 3)])
def test_an_imagefolder_reads_in_each_format_as_uint8_squares(kind, suffix, channels, tmp_path):
    ds = load_folder(write_folder(tmp_path / "pets", kind=kind, suffix=suffix), image_size=16, progress=False)
    assert ds.about['layout'] == "imagefolder" and ds.classes == ["cat", "dog"] and ds.name == "pets"
    assert ds.train.images.dtype == torch.uint8 and ds.image_shape == (channels, 16, 16)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (12, 12, 12) and ds.about['notes'] == []
    assert ds.train.labels.tolist() == [0] * 6 + [1] * 6 and (ds.train.bias == -1).all()


def test_grey_and_rgb_mixed_make_rgb_and_alpha_is_flattened_onto_white(tmp_path):
    folder = tmp_path / "d" / "train" / "a"
    folder.mkdir(parents=True)
    _image("grey").save(folder / "0.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(folder / "1.png")  # fully transparent
    (tmp_path / "d" / "train" / "b").mkdir()
    _image("rgb").save(tmp_path / "d" / "train" / "b" / "0.jpg")
    ds = load_folder(tmp_path / "d", image_size=8, progress=False)
    images = torch.cat([ds.train.images, ds.valid.images])
    assert images.shape[1] == 3
    assert (read_image(folder / "1.png", 8) == 255).all()  # transparent -> white


def test_resize_then_centre_crop_as_torchvision(tmp_path):
    """A 20 x 10 image whose left and right quarters are black: the shorter side to 8, the centre 8 x 8 kept."""
    array = np.full((10, 20), 200, dtype=np.uint8)
    array[:, :5] = array[:, 15:] = 0
    Image.fromarray(array).save(tmp_path / "wide.png")
    out = read_image(tmp_path / "wide.png", 8)
    assert out.shape == (1, 8, 8) and out.min() > 150  # the black quarters were cropped away


def test_without_val_a_stratified_seeded_share_is_carved_and_without_test_validation_stands_in(tmp_path):
    root = write_folder(tmp_path / "d", splits=("train",), n=20)
    ds = load_folder(root, image_size=8, progress=False, data_seed=3)
    assert (len(ds.train), len(ds.valid)) == (36, 4) and ds.valid.labels.tolist() == [0, 0, 1, 1]
    assert ds.test is ds.valid and any("no test split" in n for n in ds.about['notes'])
    assert any("no validation split" in n for n in ds.about['notes'])
    again = load_folder(root, image_size=8, progress=False, data_seed=3)
    assert torch.equal(again.valid.images, ds.valid.images)
    assert not torch.equal(carve(torch.arange(40) % 2, 0.1, 0), carve(torch.arange(40) % 2, 0.1, 1))


def test_a_folder_of_class_folders_is_the_training_split(tmp_path):
    root = tmp_path / "flat"
    write_folder(tmp_path / "tmp", splits=("train",))
    (tmp_path / "tmp" / "train").rename(root)
    ds = load_folder(root, image_size=8, progress=False)
    assert ds.classes == ["cat", "dog"] and len(ds.train) + len(ds.valid) == 12


def test_a_csv_manifest_with_splits_and_attributes(tmp_path):
    root = write_folder(tmp_path / "d", splits=("train",), n=4)
    rows = [{"file": f"train/{c}/{i}.png", "label": c, "split": "train" if i < 3 else "test",
             "attribute": "indoor" if (i + (c == "dog")) % 2 else "outdoor"} for c in ("cat", "dog") for i in range(4)]
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "label", "split", "attribute"])
        writer.writeheader()
        writer.writerows(rows)
    ds = load_folder(manifest, image_size=8, progress=False)
    assert ds.about['layout'] == "csv" and ds.about['attributes'] == ["indoor", "outdoor"] and ds.name == "manifest"
    assert len(ds.test) == 2 and set(ds.test.bias.tolist()) <= {0, 1}


def test_an_export_manifest_reads_back_in(tmp_path):
    """The columns ``diffinject export`` writes (file, label, kind, ...): numeric labels sorted as numbers."""
    root = tmp_path / "exported"
    rows = []
    for label in (0, 2, 10):
        (root / str(label)).mkdir(parents=True)
        for i in range(3):
            _image("rgb", seed=label * 10 + i).save(root / str(label) / f"synthetic-{i:06d}.png")
            rows.append({"file": f"{label}/synthetic-{i:06d}.png", "label": label, "kind": "synthetic"})
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "label", "kind"])
        writer.writeheader()
        writer.writerows(rows)
    ds = load_folder(root / "manifest.csv", image_size=8, progress=False)
    assert ds.classes == ["0", "2", "10"]


def test_huggingface_imagefolder_metadata_gives_attributes(tmp_path):
    root = write_folder(tmp_path / "hf", splits=("train", "test"), n=3)
    for split in ("train", "test"):
        lines = [json.dumps({"file_name": f"{c}/{i}.png", "attribute": "snow" if i == 0 else "grass"})
                 for c in ("cat", "dog") for i in range(3)]
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_folder(root, image_size=8, progress=False)
    assert ds.about['layout'] == "huggingface" and ds.about['attributes'] == ["grass", "snow"]
    assert ds.test.bias.tolist() == [1, 0, 0, 1, 0, 0]


def test_attributes_from_a_file_may_cover_only_the_test_split(tmp_path):
    root = write_folder(tmp_path / "d", n=2)
    attributes = tmp_path / "attributes.csv"
    attributes.write_text("file,attribute\ntest/cat/0.png,red\ntest/dog/1.png,blue\n")
    ds = load_folder(root, image_size=8, attributes=attributes, progress=False)
    assert ds.about['attributes'] == ["blue", "red"]
    assert ds.test.bias.tolist() == [1, -1, -1, 0] and (ds.train.bias == -1).all()


def test_symlinked_class_folders_are_followed(tmp_path):
    elsewhere = write_folder(tmp_path / "disk2", splits=("train",), n=3)
    root = tmp_path / "d" / "train"
    root.mkdir(parents=True)
    for cls in ("cat", "dog"):
        (root / cls).symlink_to(elsewhere / "train" / cls, target_is_directory=True)
    assert load_folder(tmp_path / "d", image_size=8, progress=False).classes == ["cat", "dog"]


def test_an_unreadable_image_is_refused_by_name_or_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / "d", n=3)
    bad = root / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"cannot read image {bad}.*--skip-unreadable"):
        load_folder(root, image_size=8, progress=False)
    ds = load_folder(root, image_size=8, progress=False, skip_unreadable=True)
    assert len(ds.train) == 6 and ds.about['notes'] == ["1 unreadable image(s) skipped (--skip-unreadable)"]


def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "d", n=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every test image is past it
    with pytest.raises(DataError, match="too large to decode safely"):
        load_folder(root, image_size=8, progress=False)


@pytest.mark.parametrize("make, words", [
    (lambda p: p, "does not exist"),
    (lambda p: (p.mkdir(), p)[1], "holds no folders"),
    (lambda p: (p.parent.mkdir(exist_ok=True), p.with_suffix(".txt").write_text("x"), p.with_suffix(".txt"))[2],
     "is a file but not a CSV manifest"),
    (lambda p: (write_folder(p, classes=("only",)), p)[1], "has 1 class in its training split"),
    (lambda p: ((p / "train" / "a").mkdir(parents=True), (p / "train" / "b").mkdir(), p)[2], "has no images"),
    (lambda p: (write_folder(p, splits=("train",)), write_folder(p / "x", splits=("val",), classes=("cow",)),
                (p / "x" / "val").rename(p / "val"), p)[3], "class 'cow' is in a validation or test split"),
])
def test_bad_folders_are_refused_in_one_line_naming_the_path(make, words, tmp_path):
    path = make(tmp_path / "data")
    with pytest.raises(DataError, match=words) as err:
        load_folder(path, image_size=8, progress=False)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("rows, words", [
    ("file,label\nnope.png,cat\n", "line 2: no image at"),
    ("file,label,split\ntrain/cat/0.png,cat,holdout\n", "unknown split 'holdout'"),
    ("path,label\ntrain/cat/0.png,cat\n", "has no 'file' column"),
])
def test_a_bad_manifest_is_refused_naming_the_line(rows, words, tmp_path):
    root = write_folder(tmp_path / "d", splits=("train",), n=1)
    (root / "m.csv").write_text(rows)
    with pytest.raises(DataError, match=words):
        load_folder(root / "m.csv", image_size=8, progress=False)


def test_a_released_benchmark_copy_is_pointed_to_its_own_flags(tmp_path):
    (tmp_path / "cifar10c" / "1pct" / "align").mkdir(parents=True)
    with pytest.raises(DataError, match=f"--dataset cifar10c --data-root {tmp_path} --ratio R"):
        find_layout(tmp_path / "cifar10c")


def test_the_layout_is_found(tmp_path):
    assert find_layout(write_folder(tmp_path / "a", n=1)) == "imagefolder"
    (tmp_path / "a" / "metadata.csv").write_text("file_name\n")
    assert find_layout(tmp_path / "a") == "huggingface"
