"""Ten image corruptions for grey 28 px digits: the bias of the embedded Corrupted MNIST.

In the spirit of the Corrupted CIFAR-10 protocol (Hendrycks & Dietterich's corruptions, as LfF and DisEnt use them):
each class is tied to one corruption, and a bias-conflicting sample wears another class's. CIFAR's list is made for
colour photographs; several of its members (saturate, frost's colour tint) do nothing to a grey digit on black, so
these ten are chosen to change a digit visibly and differently from each other (``tests/test_data.py`` checks
that a reader tells them apart). Each takes a float image in [0, 1] of shape (H, W) and a numpy ``Generator``
(its severity and noise come from it, so a dataset is deterministic in its seed) and returns the same shape.
numpy, PIL and scipy only.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage


def gaussian_noise(x, rng):
    return x + rng.normal(0.0, rng.uniform(0.25, 0.35), x.shape)


def gaussian_blur(x, rng):
    return ndimage.gaussian_filter(x, sigma=rng.uniform(1.3, 1.7)) * 1.6  # brightened: blur alone dims thin strokes


def fog(x, rng):
    cloud = ndimage.gaussian_filter(rng.normal(0.0, 1.0, x.shape), sigma=4.0)
    cloud = (cloud - cloud.min()) / max(np.ptp(cloud), 1e-8)
    return np.maximum(x * 0.8, cloud * rng.uniform(0.55, 0.75))


def brightness(x, rng):
    return x * 0.5 + rng.uniform(0.45, 0.55)  # the black background turns light grey, strokes near white


def contrast(x, rng):
    return x * rng.uniform(0.25, 0.35) + 0.1  # strokes fade towards a dark grey background


def spatter(x, rng):
    blobs = ndimage.gaussian_filter(rng.normal(0.0, 1.0, x.shape), sigma=1.0)
    drops = blobs > np.quantile(blobs, rng.uniform(0.86, 0.9))
    return np.where(drops, 0.6, x)  # mid-grey drops over digit and background alike


def elastic(x, rng):
    h, w = x.shape
    alpha, sigma = rng.uniform(24.0, 30.0), 3.0  # near the MNIST elastic-distortion setting (Simard et al.)
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, x.shape), sigma) * alpha
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, x.shape), sigma) * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return ndimage.map_coordinates(x, [yy + dy, xx + dx], order=1, mode="constant")


def jpeg(x, rng):
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buf, "JPEG", quality=int(rng.integers(2, 5)))
    return np.asarray(Image.open(buf).convert("L"), dtype=np.float32) / 255.0


def pixelate(x, rng):
    h, w = x.shape
    small = Image.fromarray(_to_uint8(x)).resize((w * 5 // 14, h * 5 // 14), Image.BOX)  # 28 -> 10 px
    return np.asarray(small.resize((w, h), Image.NEAREST), dtype=np.float32) / 255.0


def stripes(x, rng):
    h, w = x.shape
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    wave = 0.5 + 0.5 * np.sin((xx + yy) * 2 * np.pi / 5.0 + rng.uniform(0, 2 * np.pi))
    return np.maximum(x, wave * rng.uniform(0.35, 0.45))  # a diagonal texture over the whole image


CORRUPTIONS = (gaussian_noise, gaussian_blur, fog, brightness, contrast, spatter, elastic, jpeg, pixelate, stripes)
NAMES = tuple(f.__name__ for f in CORRUPTIONS)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def corrupt(grey: np.ndarray, index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey digits (N, H, W) uint8, each with corruption ``index[i]`` -> (N, 3, H, W) uint8 (grey in all three
    channels, so every stage sees the same image format as Colored MNIST)."""
    out = np.empty((len(grey), 3, *grey.shape[1:]), dtype=np.uint8)
    for i, (img, k) in enumerate(zip(grey, index)):
        out[i] = _to_uint8(CORRUPTIONS[int(k)](img.astype(np.float32) / 255.0, rng))[None]
    return out
