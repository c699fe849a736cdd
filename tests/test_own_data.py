"""A run on your own images end to end (``diffinject run --data``): the report without bias labels and with an
attribute file, the classifier taken away (``load_classifier``, ``diffinject predict``), the export read back in,
and the shuffle test on this path: no stage reads an attribute."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffinject import load_classifier
from diffinject.core.config import make_config
from diffinject.core.run import Run
from diffinject.workers.cli import main

CLASSES = ("circle", "square")
BACKGROUNDS = {"red": (200, 40, 40), "blue": (40, 40, 200)}  # the shortcut: red with circles, blue with squares

# the quick preset made smaller: a few seconds a run
SMALL = {"methods": ["vanilla", "diffinject"], "mining": {"k": 2, "classifier": {"epochs": 2}},
         "diffusion": {"steps": 6, "checkpoint_every": 3}, "injection": {"num_samples": 8, "batch_size": 4},
         "classifier": {"epochs": 2}}


def shape_image(cls: str, background: str, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (36, 36), BACKGROUNDS[background])
    x, y, r = *rng.integers(10, 26, 2), int(rng.integers(6, 9))
    (ImageDraw.Draw(image).ellipse if cls == "circle" else ImageDraw.Draw(image).rectangle)(
        (x - r, y - r, x + r, y + r), fill=(230, 230, 230))
    return image


def write_shapes(root: Path, n_train=40, n_test=10, conflicts=2, seed=0) -> list[dict]:
    """``root/{train,test}/<class>/*.jpg``: circles on red and squares on blue in training but for ``conflicts``
    per class, the test split balanced. Returns the rows of an attribute file (file, attribute)."""
    rng, rows = np.random.default_rng(seed), []
    for split, n in (("train", n_train), ("test", n_test)):
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                aligned = i >= conflicts if split == "train" else i % 2 == 0
                background = list(BACKGROUNDS)[c if aligned else 1 - c]
                shape_image(cls, background, rng).save(root / split / cls / f"{i}.jpg")
                rows.append({"file": f"{split}/{cls}/{i}.jpg", "attribute": background})
    return rows


def write_attributes(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "attribute"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    return root, write_shapes(root)


@pytest.fixture(scope="module")
def finished(shapes, tmp_path_factory):
    """A run on the shapes folder through the CLI, without attributes."""
    root, _ = shapes
    config = tmp_path_factory.mktemp("config") / "small.yaml"
    config.write_text(json.dumps(SMALL))
    out = tmp_path_factory.mktemp("runs") / "shapes-run"
    assert main(["run", "--preset", "quick", "--data", str(root), "--config", str(config), "--out", str(out),
                 "--no-progress", "--threads", "1"]) == 0
    return out


def test_a_run_on_a_folder_without_bias_labels_reports_what_can_be_known(finished, capsys):
    metrics = json.loads((finished / "metrics.json").read_text())
    data = metrics["dataset"]
    assert data["name"] == "shapes" and data["classes"] == list(CLASSES) and data["layout"] == "imagefolder"
    assert data["attributes"] == [] and data["train"] + data["valid"] == 80 and data["test"] == 20
    assert any("no validation split" in n for n in data["notes"])
    assert set(metrics["methods"]) == {"vanilla", "diffinject"}  # no oracle: the bias cannot be undone by hand
    for m in metrics["methods"].values():
        assert {"accuracy", "worst_class", "per_class", "disagrees_with_biased", "valid"} <= set(m)
        assert "worst_group" not in m and "unbiased" not in m
    # no precision without attributes; the miner's 2 epochs are too few to compare its error over (StillFitting)
    assert metrics["mining"] == {"mined": metrics["mining"]["mined"], "biased_epochs": 2}
    report = (finished / "report.md").read_text()
    assert "No bias attributes were given" in report and "cannot be known without bias attributes" in report
    assert json.loads((finished / "data.json").read_text())["classes"] == list(CLASSES)


def test_the_classifier_is_taken_away_and_names_classes(finished, shapes, capsys):
    root, _ = shapes
    clf = load_classifier(finished)
    assert clf.method == "diffinject" and clf.classes == list(CLASSES) and clf.image_shape == (3, 32, 32)
    files = sorted((root / "test").rglob("*.jpg"))
    names = clf.predict(files)
    assert set(names) <= set(CLASSES) and len(names) == len(files)
    metrics = json.loads((finished / "metrics.json").read_text())["methods"]["diffinject"]
    truth = [f.parent.name for f in files]
    assert round(100 * np.mean([a == b for a, b in zip(names, truth)]), 2) == metrics["accuracy"]  # as evaluated
    capsys.readouterr()
    assert main(["predict", str(finished), str(root / "test" / "circle"), "--method", "vanilla"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and all(line.split("\t")[1] in CLASSES for line in lines)
    assert main(["predict", str(finished), str(root / "nope.png")]) == 2


def test_an_export_of_your_own_data_reads_back_in(finished, tmp_path, capsys):
    assert main(["export", str(finished), "--to", str(tmp_path / "exported"), "--with-real"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "exported" / "manifest.csv")))
    assert {r["label"] for r in rows} == set(CLASSES)  # class names, as the data named them
    from diffinject.core.folders import load_folder

    ds = load_folder(tmp_path / "exported" / "manifest.csv", progress=False)
    assert ds.classes == list(CLASSES) and len(ds.train) + len(ds.valid) == len(rows)


def test_attributes_are_for_evaluation_only(shapes, tmp_path):
    """The same run with the true attributes and with them shuffled: every stage's output is the same to the bit;
    only the evaluation (group metrics, mining precision) differs."""
    root, rows = shapes
    shuffled = [dict(r, attribute=a) for r, a in zip(rows, np.random.default_rng(1).permutation(
        [r["attribute"] for r in rows]))]
    runs = {}
    for name, attribute_rows in (("true", rows), ("shuffled", shuffled)):
        cfg = make_config("quick", {**SMALL, "data": str(root),
                                    "attributes": str(write_attributes(tmp_path / f"{name}.csv", attribute_rows))})
        runs[name] = tmp_path / name
        Run(runs[name], cfg, progress=False).all()
    one, other = runs["true"], runs["shuffled"]
    for name in ("biased/model.pt", "synthetic/samples.pt", "classifiers/vanilla.pt", "classifiers/diffinject.pt"):
        a, b = torch.load(one / name, weights_only=True), torch.load(other / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (one / "unet/diffusion_pytorch_model.safetensors").read_bytes() == \
        (other / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    read = lambda d: json.loads((d / "metrics.json").read_text())  # noqa: E731
    true = read(one)
    assert true["dataset"]["attributes"] == ["blue", "red"]
    assert {"group_balanced", "worst_group", "aligned", "conflicting"} <= set(true["methods"]["vanilla"])
    assert {"precision", "recall", "true_conflicts"} <= set(true["mining"]) and true["mining"]["true_conflicts"] == 4
    assert true["methods"] != read(other)["methods"] or true["mining"] != read(other)["mining"]
    assert "were read for these columns only" in (one / "report.md").read_text()


def test_the_service_registers_your_own_data_by_relative_path(shapes):
    from diffinject.workers.prepare import served_datasets

    root, _ = shapes
    record = served_datasets({"pets": {"data": root.name}}, "runs/serve", str(root.parent))["pets"]
    assert record.config.data == str(root.resolve()) and record.config.dataset == "shapes"
    for bad in (str(root), "../shapes"):
        with pytest.raises(ValueError, match="data .* must be a relative path without '..'"):
            served_datasets({"pets": {"data": bad}}, "runs/serve", str(root.parent))
