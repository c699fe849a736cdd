"""Does injection work? Evaluation-only instruments and the pictures a person looks at.

* :func:`injection_report` (the embedded benchmarks): :class:`Readers` read every synthetic sample's class and
  bias value (Colored MNIST: an MLP on colour-free digits and the nearest palette colour; Corrupted MNIST: an
  MLP and a small CNN trained on an unbiased corrupted copy). It reports the share with the content's digit, with
  the style's bias value, with both, with the reverse (the style's digit with the content's bias), with neither,
  and with the content's digit under any bias other than the content's class's own (a true bias conflict).
* :func:`biased_disagreement`: the label-free signal for any dataset, the share of synthetic samples the
  biased classifier gets wrong (they conflict with the shortcut it learned).
* :func:`save_grid`: PNG grids, with row and column labels; :func:`mined_grid` (the mined samples, a row per
  class) and :func:`injection_grid` (style | content | result triples under column headers) use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .artifacts import save_image
from .classifier import ClassifierConfig, predict, train_classifier
from .data import COLOURED, EMBEDDED, PALETTE, Dataset


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


class Readers:
    """What class and which bias value an image shows, on an embedded benchmark. Evaluation only.

    Colored MNIST and Colored Fashion-MNIST: the class reader is an MLP trained on colour-free training images (task
    labels only), the bias reader :func:`read_colour`. Corrupted MNIST: an MLP (class) and a small CNN (corruption:
    texture an MLP misses) trained on three copies of the training digits, each drawn with a uniformly random
    corruption (an unbiased copy that only the evaluation may build: it uses the corruptions). Their accuracies on the
    unbiased test split are part of every report, so the instruments can be checked.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, epochs: int = 30, progress: bool = False):
        cfg = ClassifierConfig(arch="mlp", epochs=epochs)
        tr, va, te = dataset.train, dataset.valid, dataset.test
        self.bias_attribute = "colour" if dataset.name in COLOURED else "corruption"

        def fit(x, y, vx, vy, desc, cfg=cfg):
            return train_classifier(x, y, vx, vy, cfg, dataset.num_classes, seed, desc=desc, progress=progress)

        if dataset.name in COLOURED:
            self._class = fit(colour_free(tr.images), tr.labels, colour_free(va.images), va.labels, "shape reader")
            self._prep, self._bias = colour_free, None
        else:
            images, labels, bias = _unbiased_copy(dataset, tr, seed, copies=3)
            self._class = fit(images, labels, va.images, va.labels, "class reader")
            self._bias = fit(images, bias, va.images, va.bias, "bias reader",
                             ClassifierConfig(arch="cnn", epochs=15, batch_size=128))
            self._prep = lambda x: x  # noqa: E731
        self.class_accuracy = round(100.0 * (self.read_class(te.images) == te.labels).float().mean().item(), 2)
        self.bias_accuracy = round(100.0 * (self.read_bias(te.images) == te.bias).float().mean().item(), 2)

    def read_class(self, images: torch.Tensor) -> torch.Tensor:
        return predict(self._class, self._prep(images)).argmax(1)

    def read_bias(self, images: torch.Tensor) -> torch.Tensor:
        return read_colour(images) if self._bias is None else predict(self._bias, images).argmax(1)


def _unbiased_copy(dataset: Dataset, split, seed: int, copies: int = 1):
    """``copies`` times the split's grey digits, each with a uniformly random bias value (the benchmark's own bias
    function): images, labels, bias values."""
    rng = np.random.default_rng([seed, 11])
    grey = np.concatenate([split.extras["grey"][:, 0].numpy()] * copies)
    bias = rng.integers(0, dataset.num_classes, size=len(grey))
    images = EMBEDDED[dataset.name](grey, bias, rng)
    return torch.from_numpy(images), split.labels.repeat(copies), torch.from_numpy(bias)


def readers_for(dataset: Dataset, seed: int = 0) -> Readers | None:
    """The benchmark's readers, or None where the bias cannot be read (a folder dataset)."""
    if dataset.name not in EMBEDDED or "grey" not in dataset.train.extras:
        return None
    return Readers(dataset, seed=seed)


def biased_disagreement(biased_model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of samples the biased classifier gets wrong: label-free evidence of a bias conflict."""
    return round(100.0 * (predict(biased_model, images).argmax(1) != labels).float().mean().item(), 2)


def injection_report(synthetic, train_images: torch.Tensor, train_labels: torch.Tensor, readers: Readers,
                     train_bias: torch.Tensor | None = None) -> dict:
    """Shares (percent) of synthetic samples by what the readers see. Evaluation only.

    "colour" in the keys is the benchmark's bias attribute (``bias_attribute``: colour or corruption); the keys
    keep their Colored MNIST names so every results file reads the same. With the hidden ``train_bias``,
    ``by_content`` splits the samples by whether their content is a true bias conflict or an aligned sample the
    miner took: the two fail for different reasons (the U-Net's fidelity, the miner's precision).
    """
    digit = readers.read_class(synthetic.images)
    colour = readers.read_bias(synthetic.images)
    c_label, s_label = train_labels[synthetic.content], train_labels[synthetic.style]
    c_colour = readers.read_bias(train_images[synthetic.content])
    s_colour = readers.read_bias(train_images[synthetic.style])
    content_digit, style_colour = digit == c_label, colour == s_colour
    pct = lambda m: round(100.0 * m.float().mean().item(), 2)  # noqa: E731
    target = content_digit & (colour != c_label)
    report = {
        "samples": int(len(digit)),
        "bias_attribute": readers.bias_attribute,
        "content_digit": pct(content_digit),
        "style_colour": pct(style_colour),
        "both": pct(content_digit & style_colour),
        "reverse": pct((digit == s_label) & (colour == c_colour)),
        "neither": pct(~content_digit & ~style_colour),
        # the target of "Make injection pay": the content's class with a bias other than its class's own
        "content_digit_other_colour": pct(target),
        "shape_reader_test_accuracy": readers.class_accuracy,
        "colour_reader_test_accuracy": readers.bias_accuracy,
    }
    if train_bias is not None:
        report["by_content"] = {}
        conflict = train_bias[synthetic.content] != c_label
        for name, chosen in (("true-conflict", conflict), ("aligned", ~conflict)):
            part = {"share": pct(chosen)}
            if chosen.any():  # a miner of perfect precision leaves no aligned contents
                part |= {"content_digit": pct(content_digit[chosen]), "content_digit_other_colour": pct(target[chosen])}
            report["by_content"][name] = part
    return report


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 3, pad: int = 2,
              row_labels: list[str] | None = None, column_labels: list[str] | None = None, group: int = 0) -> None:
    """Save rows of uint8 images (each row (n_i, C, H, W)) as one PNG, upscaled ``scale`` times, on grey.

    ``row_labels`` (one per row) are written in a margin at the left, and then an empty row keeps its place;
    ``column_labels`` (one per column) in a band above. Without labels, empty rows are left out. ``group`` > 0
    widens the gap after every ``group`` columns, so that groups of columns read apart."""
    if row_labels is None:
        rows = [r for r in rows if len(r)]
    elif len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    if not any(len(r) for r in rows):
        return
    c, h, w = next(r for r in rows if len(r)).shape[1:]
    cols = max(len(r) for r in rows)
    H, W = h * scale + pad, w * scale + pad
    font, draw = _font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = lambda text: draw.textbbox((0, 0), text, font=font)[2:]  # noqa: E731 - (right, bottom) of the text
    left = max(size(label)[0] for label in row_labels) + 3 * pad if row_labels else 0
    top = max(size(label)[1] for label in column_labels) + 2 * pad if column_labels else 0
    gap = 4 * pad if group else 0
    x_of = [left + pad + j * W + (j // group * gap if group else 0) for j in range(cols)]  # each column's left edge
    canvas = np.full((top + len(rows) * H + pad, x_of[-1] + W, 3), 96, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            a = img.numpy().transpose(1, 2, 0)
            a = np.repeat(a, 3, axis=2) if c == 1 else a
            a = a.repeat(scale, 0).repeat(scale, 1)
            y, x = top + pad + i * H, x_of[j]
            canvas[y : y + h * scale, x : x + w * scale] = a
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for i, label in enumerate(row_labels or []):  # centred on its row
        draw.text((pad, top + pad + i * H + (h * scale - size(label)[1]) // 2), label, fill=(255, 255, 255), font=font)
    for j, label in enumerate(column_labels or []):  # centred over its column
        draw.text((x_of[j] + (w * scale - size(label)[0]) // 2, pad), label, fill=(255, 255, 255), font=font)
    save_image(path, image)


def _font() -> ImageFont.ImageFont:
    """PIL's own font, no font file needed: its scalable one where PIL has FreeType, else its bitmap one."""
    try:
        return ImageFont.load_default(size=14)
    except (ImportError, OSError):
        return ImageFont.load_default()


def mined_grid(images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray, num_classes: int,
               path: str | Path) -> None:
    """The mined samples, one row per class, each labelled with its class (a class none was mined from stays
    empty)."""
    rows = [images[indices[labels[indices] == c]] for c in range(num_classes)]
    save_grid(rows, path, row_labels=[f"class {c}" for c in range(num_classes)])


TRIPLE = ("style", "content", "result")


def injection_grid(train_images: torch.Tensor, synthetic, path: str | Path, rows: int = 12) -> None:
    """style | content | result, one pair per triple, two triples side by side per row, under column headers."""
    n = min(rows * 2, len(synthetic.images))
    triplets = [torch.stack([train_images[synthetic.style[i]], train_images[synthetic.content[i]], synthetic.images[i]])
                for i in range(n)]
    half = (n + 1) // 2
    grid = [torch.cat([triplets[i]] + ([triplets[i + half]] if i + half < n else [])) for i in range(half)]
    save_grid(grid, path, column_labels=list(TRIPLE) * (2 if n > 1 else 1), group=len(TRIPLE))
