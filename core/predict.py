"""A finished run's debiased classifier, to use on new images: :func:`load_classifier` reads it with its class names
and preprocessing from the run folder (its config, ``data.json`` and ``classifiers/<method>.pt``), never the data.

    clf = diffinject.load_classifier("runs/pets-seed0-default")
    clf.predict(["a.jpg", "b.png"])      # ['cat', 'dog']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import methods as registry
from .artifacts import CorruptFile, check, read_json
from .classifier import predict
from .folders import is_image, read_image, to_square, walk_images
from .run import recorded_params, saved_config

# the label-free rows, in the order load_classifier prefers them
PREFERRED = ("diffinject", "lff+diffinject", "jtt+diffinject", "disent+diffinject", "denetdm+diffinject")


@dataclass
class Classifier:
    """A trained classifier with what it needs to read an image: the class names, the image size and channels."""

    model: torch.nn.Module
    classes: list[str]
    image_shape: tuple[int, int, int]  # (channels, size, size) as it was trained
    method: str

    def preprocess(self, image: str | Path | Image.Image) -> torch.Tensor:
        """A file or PIL image as the run read its data (core.folders): alpha flattened, shorter side resized,
        centre-cropped, uint8 (C, size, size) in the run's channels."""
        c, size, _ = self.image_shape
        if isinstance(image, Image.Image):
            array = torch.from_numpy(np.array(to_square(image, size), dtype=np.uint8))
            array = array[None] if array.ndim == 2 else array.permute(2, 0, 1)
        else:
            array = torch.from_numpy(read_image(Path(image), size))
        if array.shape[0] != c:  # grey into an RGB model, or RGB into a grey one
            array = array.expand(3, -1, -1) if c == 3 else array.float().mean(0, keepdim=True).round().byte()
        return array

    @torch.no_grad()
    def logits(self, images) -> torch.Tensor:
        """Logits (N, classes) of files or PIL images."""
        return predict(self.model, torch.stack([self.preprocess(i) for i in images]))

    def predict(self, images) -> list[str]:
        """The class name of each image (files or PIL images)."""
        return [self.classes[i] for i in self.logits(images).argmax(1).tolist()]


def _checked(run_dir: Path, stage: str, what: str) -> None:
    found = check(run_dir, stage)
    if found.problems:
        raise CorruptFile(run_dir / stage, "; ".join(found.problems) + "; rerun the run's command to redo it")
    if not found.sealed:
        raise FileNotFoundError(f"{run_dir} has no finished {what}: run (or rerun) its command first")


def trained_methods(run_dir: str | Path) -> list[str]:
    """The methods whose classifier the run in ``run_dir`` finished."""
    folder = Path(run_dir) / "classifiers"
    return sorted(p.stem for p in folder.glob("*.pt") if not p.name.endswith(".ckpt.pt")) if folder.is_dir() else []


def load_classifier(run_dir: str | Path, method: str | None = None) -> Classifier:
    """The classifier ``method`` trained in the finished run ``run_dir``, in eval mode on the CPU. Default: the
    label-free DiffInject row (``diffinject``, else the first of :data:`PREFERRED` the run trained), else the row
    with the best validation accuracy."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    done = trained_methods(run_dir)
    if method is None:
        method = next((m for m in PREFERRED if m in done), None) or max(
            done, key=lambda m: read_json(run_dir / "classifiers" / f"{m}.json").get("valid", 0.0), default=None)
    if method not in done:
        raise ValueError(f"{run_dir} has no trained classifier {method!r}" +
                         (f"; it has {', '.join(done)}" if done else ": finish the run first"))
    _checked(run_dir, "data", "data.json")
    _checked(run_dir, f"classifier-{method}", f"{method} classifier")
    cfg, data = saved_config(run_dir), read_json(run_dir / "data.json")
    record = read_json(run_dir / "classifiers" / f"{method}.json")
    learner = registry.get(method, {k: v for k, v in recorded_params(record).items()
                                    if k in registry.get(method).params.__dataclass_fields__})
    shape = tuple(data["image_shape"])
    model = learner.load(run_dir / "classifiers" / f"{method}.pt", cfg.classifier, shape, len(data["classes"]))
    return Classifier(model, list(data["classes"]), shape, method)


def image_files(paths) -> list[Path]:
    """Files as given, folders as every image below them (sorted); a path that is neither is refused."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += walk_images(p)
        elif p.is_file() and is_image(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} is not an image file or a folder of images")
    return files
