"""Colored Fashion-MNIST built from Fashion-MNIST's IDX files: the splits and colours of LfF's protocol, determinism
and the cache, the errors for missing or malformed files, and a quick run on it. The IDX files are written here
(small, random garments), so neither the tests nor CI need the real data."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from diffinject.core.data import (FASHION_CLASSES, PALETTE, DataError, build_colored_fmnist, cache_dir, load_dataset,
                                  read_idx)
from diffinject.workers.cli import main

N_TRAIN, N_TEST = 240, 60


def write_idx(path, array: np.ndarray, zipped: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if zipped else data)


def write_fashion(folder, n_train=N_TRAIN, n_test=N_TEST, seed=0, zipped=True):
    """Fashion-MNIST's four files: grey blobs (a bright square whose size follows the class) on black."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if zipped else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            r = 4 + c
            images[i, 14 - r:14 + r, 14 - r:14 + r] = rng.integers(120, 256, (2 * r, 2 * r))
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, zipped)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, zipped)
    return folder


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fashion"))


def test_splits_follow_the_protocol(fashion):
    ds = build_colored_fmnist(5.0, 0, fashion)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (N_TRAIN - N_TRAIN // 12, N_TRAIN // 12, N_TEST)
    assert ds.train.images.shape[1:] == (3, 28, 28) and ds.train.images.dtype == torch.uint8
    assert ds.class_names == list(FASHION_CLASSES)
    # train: 5 % in another class's colour, the rest in their own; valid and test: colours drawn uniformly
    conflicts = (ds.train.bias != ds.train.labels).sum().item()
    assert conflicts == round(len(ds.train) * 0.05)
    for split in (ds.valid, ds.test):
        assert 0.6 < (split.bias != split.labels).float().mean().item() < 1.0
    # the garment is coloured (its class's palette colour, jittered) and the background stays black
    grey = ds.train.extras["grey"][:, 0]
    assert (ds.train.images.amax(1)[grey == 0] == 0).all()
    i = int((ds.train.bias == 2).nonzero()[0])  # a yellow garment: red and green high, blue low
    mean = ds.train.images[i].float().flatten(1)[:, grey[i].flatten() > 0].mean(1) / grey[i][grey[i] > 0].float().mean()
    assert torch.allclose(mean, torch.from_numpy(PALETTE[2]), atol=0.1)


def test_deterministic_in_the_data_seed_and_cached(fashion):
    a, b = load_dataset("colored_fmnist", 1.0, data_root=str(fashion)), build_colored_fmnist(1.0, 0, fashion)
    c = build_colored_fmnist(1.0, 1, fashion)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.bias, b.test.bias)
    assert not torch.equal(a.train.labels, c.train.labels)  # another seed holds out other images
    cached = list(cache_dir().glob("colored_fmnist-*-1pct-seed0-*.npz"))
    assert len(cached) == 1
    again = load_dataset("colored_fmnist", 1.0, data_root=str(fashion))  # read back from the cache
    assert torch.equal(again.train.images, a.train.images) and again.class_names == list(FASHION_CLASSES)


def test_unzipped_files_and_the_environment_variable(tmp_path, monkeypatch):
    folder = write_fashion(tmp_path / "raw", zipped=False)
    monkeypatch.setenv("FASHION_MNIST", str(folder))
    ds = load_dataset("colored_fmnist", 2.0)
    assert torch.equal(ds.train.images, build_colored_fmnist(2.0, 0, folder).train.images)


def test_missing_or_malformed_files_are_one_line_errors(tmp_path, fashion):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as e:
        build_colored_fmnist(1.0, 0, tmp_path)
    assert "\n" not in str(e.value) and "t10k-labels-idx1-ubyte.gz" in str(e.value)
    bad = tmp_path / "bad"
    write_fashion(bad)
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x09abc"))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz holds 3 bytes"):
        build_colored_fmnist(1.0, 0, bad)
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read .*train-labels"):
        read_idx(bad / "train-labels-idx1-ubyte.gz")


def test_a_quick_run_reports_every_row_and_the_injection(fashion, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--dataset", "colored_fmnist", "--data-root", str(fashion), "--preset", "quick",
                 "--out", str(out), "--no-progress", "--threads", "2"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"vanilla", "lff", "diffinject", "oracle"}
    report = json.loads((out / "synthetic" / "injection.json").read_text())["report"]
    assert report["bias_attribute"] == "colour" and report["colour_reader_test_accuracy"] > 90
