"""Vanilla: plain cross entropy on the training split (ERM)."""

from __future__ import annotations

from ..classifier import train_classifier
from .base import Method, Trained


class Vanilla(Method):
    name, label = "vanilla", "Vanilla"

    def fit(self, train, valid, num_classes, cfg, seed, device="cpu", progress=True, on_epoch=None,
            checkpoint=None) -> Trained:
        return Trained(train_classifier(train.images, train.labels, valid.images, valid.labels, cfg, num_classes, seed,
                                        device=device, desc=self.name, progress=progress, on_epoch=on_epoch,
                                        checkpoint=checkpoint))
