"""JTT, Just Train Twice (Liu et al., ICML 2021): train ERM for ``first_epochs`` epochs, collect the training
samples it gets wrong (the error set), then train a fresh model with the error set upweighted ``lambda_up`` times.

Upweighting is the reference's upsampling (each error sample listed ``lambda_up`` times), with each epoch drawing as
many samples as the training split has, so JTT trains the same number of steps as every other method. The error set
is returned in ``Trained.info`` and is a mining signal too: the pipeline reports its precision against the hidden
bias labels, as it does for mining.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..classifier import predict, train_classifier
from .base import Method, Trained


@dataclass
class JTTParams:
    first_epochs: int = 10  # T: epochs of the identification model (chosen on validation: hparams_jtt.md)
    lambda_up: int = 100  # the error set's weight (chosen on validation: hparams_jtt.md)

    def __post_init__(self):
        if self.first_epochs < 1 or self.lambda_up < 1:
            raise ValueError(f"JTT needs first_epochs >= 1 and lambda_up >= 1, got {self.first_epochs}, {self.lambda_up}")


def error_set(model, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """Indices of the samples ``model`` predicts wrongly."""
    return torch.nonzero(predict(model, images, device=device).argmax(1) != labels).flatten()


def upsampled_order(n: int, errors: torch.Tensor, lambda_up: int):
    """An epoch order for :func:`core.classifier.train_loop`: ``n`` draws from the training indices with each error
    sample listed ``lambda_up`` times (without replacement within that list), so a sample's expected share of the
    draws is its weight over the total weight ``n + (lambda_up - 1) * len(errors)``."""
    pool = torch.cat([torch.arange(n), errors.repeat(lambda_up - 1)])

    def order(epoch: int, g: torch.Generator) -> torch.Tensor:
        return pool[torch.randperm(len(pool), generator=g)[:n]]

    return order


class JTT(Method):
    name, label, Params = "jtt", "JTT", JTTParams

    def fit(self, train, valid, num_classes, cfg, seed, device="cpu", progress=True, on_epoch=None,
            checkpoint=None) -> Trained:
        # both phases checkpoint into one file, each under its own name: a rerun in the second phase gets the
        # identification model back from the first phase's last entry, without training it again
        first = train_classifier(train.images, train.labels, None, None, replace(cfg, epochs=self.params.first_epochs),
                                 num_classes, seed, device=device, desc="jtt (ERM)", progress=progress,
                                 checkpoint=checkpoint)
        errors = error_set(first, train.images, train.labels, device)
        model = train_classifier(train.images, train.labels, valid.images, valid.labels, cfg, num_classes, seed,
                                 device=device, desc=self.name, progress=progress, on_epoch=on_epoch,
                                 order=upsampled_order(len(train), errors, self.params.lambda_up),
                                 checkpoint=checkpoint)
        return Trained(model, {"error_set": errors.tolist()})
