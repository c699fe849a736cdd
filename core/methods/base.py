"""The one interface every debiasing method implements (DomainBed's ``Algorithm``), and the loss EMA LfF and
DisEnt share.

A method is a learner plus the extra data it learns from. The pipeline builds that data (the synthetic samples of a
DiffInject U-Net, or the oracle's redrawn digits), appends it to the training split, blanks every bias label, and
calls :meth:`Method.fit`; so no method can read a bias label, and any learner can be combined with synthetic data by
one subclass that sets ``extra``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from ..artifacts import load_torch
from ..classifier import ClassifierConfig, build_classifier
from ..data import ImageSet


@dataclass
class NoParams:
    """A method without hyperparameters of its own (it uses the shared ``ClassifierConfig``)."""


@dataclass
class Trained:
    """What :meth:`Method.fit` returns: the model chosen on the validation split and what it learnt on the way
    (``info``, e.g. JTT's error set as training indices; the pipeline scores those against the hidden bias labels)."""

    model: nn.Module
    info: dict = field(default_factory=dict)


class Method:
    """One debiasing method: a name, a row label for tables, the extra data it learns from, its hyperparameters.

    Subclasses set ``name``, ``label`` and, where they have any, ``Params`` (a dataclass: its field defaults are
    the method's defaults, overridable per run with ``RunConfig.hparams[name]``), and implement :meth:`fit`.
    ``extra`` names the data appended to the training split: ``None``, a synthetic source of the pipeline
    (``"diffinject"``, ``"diffinject-corpus"``) or ``"oracle"``. ``bias_knowledge`` marks rows that are ceilings or
    use knowledge of the bias, never the method.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    extra: ClassVar[str | None] = None
    bias_knowledge: ClassVar[bool] = False
    Params: ClassVar[type] = NoParams

    def __init__(self, params: dict | None = None):
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"hyperparameters of method {self.name!r} must be a mapping, got {params!r}")
        known = {f.name for f in fields(self.Params)}
        unknown = sorted(set(params or {}) - known)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)} for method {self.name!r}"
                             f" (it has {', '.join(sorted(known)) or 'none'})")
        self.params = self.Params(**(params or {}))

    def fit(self, train: ImageSet, valid: ImageSet, num_classes: int, cfg: ClassifierConfig, seed: int,
            device: str = "cpu", progress: bool = True, on_epoch=None, checkpoint: Path | None = None) -> Trained:
        """Train on ``train`` (its bias labels blanked, the extra data already appended); choose the checkpoint on
        ``valid`` by task accuracy; call ``on_epoch(epoch, valid_accuracy)`` after each epoch. ``checkpoint`` (a
        file, optional) goes to every :func:`~core.classifier.train_loop` of the method with every model,
        optimizer and loss average its steps use, so a rerun resumes after the last complete epoch."""
        raise NotImplementedError

    def build(self, cfg: ClassifierConfig, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        """An untrained model of the kind :meth:`fit` returns, to load a saved ``state_dict`` into."""
        return build_classifier(cfg, image_shape, num_classes)

    def load(self, path: Path, cfg: ClassifierConfig, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        """The model :meth:`fit` saved as a ``state_dict`` at ``path``, in eval mode."""
        model = self.build(cfg, image_shape, num_classes)
        model.load_state_dict(load_torch(path))
        return model.eval()


class LossEMA:
    """Per-sample exponential moving average of a loss, as LfF's and DisEnt's reference code keep it: a sample's
    first value is taken whole, later ones as ``alpha * old + (1 - alpha) * new``; ``normalised`` divides by the
    largest average in the sample's class (samples not yet seen count as 0)."""

    def __init__(self, labels: torch.Tensor, alpha: float):
        self.labels, self.alpha = labels, alpha
        self.value = torch.zeros(len(labels))
        self.seen = torch.zeros(len(labels))

    def update(self, loss: torch.Tensor, idx: torch.Tensor) -> None:
        self.value[idx] = self.alpha * self.value[idx] + (1 - self.alpha * self.seen[idx]) * loss.detach().cpu()
        self.seen[idx] = 1.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"value": self.value.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.value, self.seen = state["value"].clone(), state["seen"].clone()

    def normalised(self, idx: torch.Tensor) -> torch.Tensor:
        top = torch.zeros(int(self.labels.max()) + 1).scatter_reduce(0, self.labels, self.value, "amax")
        return self.value[idx] / top[self.labels[idx]].clamp_min(1e-8)


def relative_difficulty(ema_biased: LossEMA, ema_debiased: LossEMA, idx: torch.Tensor) -> torch.Tensor:
    """LfF's (and DisEnt's) per-sample weight W = L_b / (L_b + L_d), from class-normalised loss averages."""
    lb, ld = ema_biased.normalised(idx), ema_debiased.normalised(idx)
    return lb / (lb + ld + 1e-8)


def difficulty_weights(ema_biased: LossEMA, ema_debiased: LossEMA, idx: torch.Tensor, from_extra: torch.Tensor,
                       cap_extra: bool) -> torch.Tensor:
    """A batch's per-sample loss weights for LfF and DisEnt: the relative difficulty, with the extra (synthetic)
    samples capped at their share of the batch's weight when ``cap_extra`` (:func:`cap_extra_weight`)."""
    w = relative_difficulty(ema_biased, ema_debiased, idx)
    return cap_extra_weight(w, from_extra) if cap_extra else w


def cap_extra_weight(w: torch.Tensor, from_extra: torch.Tensor) -> torch.Tensor:
    """Scale down the weights of a batch's extra samples (the synthetic ones) where they hold more than their share
    of the batch's weight. On real + synthetic, LfF's relative difficulty gives most of its weight to the synthetic
    samples, which a biased model gets wrong by design, and takes it from the real bias-conflicting samples
    (benchmarks/lff_weights.py: 87 % of the weight on 23 % of the samples at 5 %)."""
    share = from_extra.float().mean()
    if share in (0.0, 1.0):
        return w
    extra_sum, real_sum = w[from_extra].sum(), w[~from_extra].sum()
    limit = share * real_sum / (1 - share)  # extra / (extra + real) <= share
    if extra_sum <= limit:
        return w
    return torch.where(from_extra, w * (limit / extra_sum), w)

