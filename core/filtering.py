"""Label-free filtering of synthetic samples: keep those whose shape follows their content image (the consistency
filter), or those a label-free classifier trained on the real split assigns to their label (:func:`vet`).

An injection either moves the content's shape into the style image (what debiasing needs), leaves the style's
shape, or breaks the image. The score tells these apart from the pair's own pixels alone, with no label of any
kind: the correlation of the sample's colour-free strokes (the maximum over channels, so a digit scores the same
in any colour) with its content image's, minus the same with its style image's. ``InjectionConfig.keep_fraction``
below 1 generates ``count / keep_fraction`` samples and keeps the ``count`` best scored
(benchmarks/results/experiments.md measured the effect). It reads no label of any kind, but a colour-free score is
built on knowing that colour is the bias: a row that turns it on is labelled so (``Run.describe_source``), and it is
off by default.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .classifier import predict
from .injection import Synthetic


def _strokes(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, H*W) colour-free intensity, centred."""
    x = images.float().amax(1).flatten(1)
    return x - x.mean(1, keepdim=True)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)


def consistency_scores(synthetic: Synthetic, images: torch.Tensor) -> torch.Tensor:
    """Per sample: corr(strokes(sample), strokes(content)) - corr(strokes(sample), strokes(style)), in [-2, 2].

    ``images`` is the training set the pairs index into (uint8, the samples' size).
    """
    sample = _strokes(synthetic.images)
    return (_correlation(sample, _strokes(images[synthetic.content]))
            - _correlation(sample, _strokes(images[synthetic.style])))


def keep_consistent(synthetic: Synthetic, images: torch.Tensor, count: int) -> Synthetic:
    """The ``count`` samples with the highest :func:`consistency_scores`, in their original order."""
    if count >= len(synthetic.labels):
        return synthetic
    scores = consistency_scores(synthetic, images)
    return synthetic.take(torch.sort(torch.argsort(scores, descending=True, stable=True)[:count]).values)


def vet(synthetic: Synthetic, classifier: nn.Module, device: str = "cpu") -> Synthetic:
    """The samples ``classifier`` assigns to their label, in their order. With a classifier trained on the real
    split alone by a label-free method (``vetted_by``, see :meth:`Run.vetted <core.pipeline.Run.vetted>`) this drops
    the injections that kept the style image's class or broke the image, without reading a bias label."""
    return synthetic.take(predict(classifier, synthetic.images, device=device).argmax(1) == synthetic.labels)
