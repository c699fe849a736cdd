"""Does injection work? Evaluation-only instruments and the pictures a person looks at.

* :func:`injection_report` (Colored MNIST): a *shape reader* (an MLP trained on colour-free digits) and a
  *colour reader* (nearest palette colour of the brightest stroke pixels) read every synthetic sample. It
  reports the share with the content's digit, with the style's colour, with both, with the reverse (the
  style's digit in the content's colour), with neither, and with the content's digit in any colour other than
  the content's class colour (a true bias conflict).
* :func:`biased_disagreement`: the label-free signal for any dataset, the share of synthetic samples the
  biased classifier gets wrong (they conflict with the shortcut it learned).
* :func:`save_grid`: PNG grids (mined samples per class; style | content | result rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .classifier import ClassifierConfig, accuracy, predict, train_classifier
from .data import PALETTE, Dataset


# The shares injection_report gives, in the order tables show them.
REPORT_KEYS = ("content_digit", "style_colour", "both", "reverse", "neither", "content_digit_other_colour")


def colour_free(images: torch.Tensor) -> torch.Tensor:
    """Max over channels, stretched so each image's brightest pixel is 255: the digit without its colour."""
    grey = images.float().amax(dim=1, keepdim=True)
    peak = grey.flatten(1).amax(1).clamp_min(1.0)[:, None, None, None]
    return (grey * 255.0 / peak).round().to(torch.uint8)


def read_colour(images: torch.Tensor) -> torch.Tensor:
    """Palette index of each image's stroke colour (mean RGB of pixels within 70 % of the brightest)."""
    x = images.float() / 255.0
    bright = x.amax(dim=1)
    mask = bright >= 0.7 * bright.flatten(1).amax(1)[:, None, None]
    mean = (x * mask[:, None]).sum((2, 3)) / mask.sum((1, 2)).clamp_min(1)[:, None]
    dist = torch.cdist(mean, torch.from_numpy(PALETTE))
    return dist.argmin(1)


class ShapeReader:
    """Reads the digit regardless of colour. Trained on colour-free training digits (task labels only)."""

    def __init__(self, dataset: Dataset, seed: int = 0, epochs: int = 30, progress: bool = False):
        cfg = ClassifierConfig(arch="mlp", epochs=epochs)
        self.model = train_classifier(colour_free(dataset.train.images), dataset.train.labels,
                                      colour_free(dataset.valid.images), dataset.valid.labels, cfg,
                                      dataset.num_classes, seed, desc="shape reader", progress=progress)
        self.test_accuracy = round(100.0 * accuracy(self.model, colour_free(dataset.test.images), dataset.test.labels), 2)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return predict(self.model, colour_free(images)).argmax(1)


def biased_disagreement(biased_model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of samples the biased classifier gets wrong: label-free evidence of a bias conflict."""
    return round(100.0 * (predict(biased_model, images).argmax(1) != labels).float().mean().item(), 2)


def injection_report(synthetic, train_images: torch.Tensor, train_labels: torch.Tensor, reader: ShapeReader,
                     test_bias: torch.Tensor | None = None, test_images: torch.Tensor | None = None) -> dict:
    """Shares (percent) of synthetic samples by what the readers see. Evaluation only."""
    digit = reader(synthetic.images)
    colour = read_colour(synthetic.images)
    c_label, s_label = train_labels[synthetic.content], train_labels[synthetic.style]
    c_colour, s_colour = read_colour(train_images[synthetic.content]), read_colour(train_images[synthetic.style])
    content_digit, style_colour = digit == c_label, colour == s_colour
    pct = lambda m: round(100.0 * m.float().mean().item(), 2)  # noqa: E731
    report = {
        "samples": int(len(digit)),
        "content_digit": pct(content_digit),
        "style_colour": pct(style_colour),
        "both": pct(content_digit & style_colour),
        "reverse": pct((digit == s_label) & (colour == c_colour)),
        "neither": pct(~content_digit & ~style_colour),
        # the target of "Make injection pay": the content's digit in a colour other than its class colour
        "content_digit_other_colour": pct(content_digit & (colour != c_label)),
        "shape_reader_test_accuracy": reader.test_accuracy,
    }
    if test_bias is not None and test_images is not None:
        report["colour_reader_test_accuracy"] = pct(read_colour(test_images) == test_bias)
    return report


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 3, pad: int = 2) -> None:
    """Save rows of uint8 images (each row (n_i, C, H, W)) as one PNG, upscaled ``scale`` times, on grey."""
    rows = [r for r in rows if len(r)]
    if not rows:
        return
    c, h, w = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    H, W = h * scale + pad, w * scale + pad
    canvas = np.full((len(rows) * H + pad, cols * W + pad, 3), 96, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            a = img.numpy().transpose(1, 2, 0)
            a = np.repeat(a, 3, axis=2) if c == 1 else a
            a = a.repeat(scale, 0).repeat(scale, 1)
            canvas[pad + i * H : pad + i * H + h * scale, pad + j * W : pad + j * W + w * scale] = a
    Image.fromarray(canvas).save(path)


def injection_grid(train_images: torch.Tensor, synthetic, path: str | Path, rows: int = 12) -> None:
    """style | content | result, one pair per row (several rows side by side)."""
    n = min(rows * 2, len(synthetic.images))
    triplets = [torch.stack([train_images[synthetic.style[i]], train_images[synthetic.content[i]], synthetic.images[i]])
                for i in range(n)]
    half = (n + 1) // 2
    grid = [torch.cat([triplets[i]] + ([triplets[i + half]] if i + half < n else [])) for i in range(half)]
    save_grid(grid, path)
