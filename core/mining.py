"""Stage 1: mine bias-conflict samples without bias labels.

A classifier trained with GCE (q = 0.7) latches onto the easy, bias-aligned shortcut; the training samples
it still gets wrong (highest plain cross entropy) are, mostly, the bias-conflicting ones. We keep the K
highest-loss samples of each class. With ``misclassified_only`` we keep, of those, only the ones the biased model
also predicts wrongly (a class with none keeps its single highest-loss sample): a sample the shortcut gets right
is bias-aligned, whatever its loss (docs/experiments.md measured precision and the effect).

``min_loss`` keeps, further, only the samples whose loss exceeds it, i.e. to whose own label the biased model gives
less than ``exp(-min_loss)``. A strongly biased model is all but certain of the class its shortcut points at on a
true conflict, while its mistakes on bias-aligned digits (illegible ones, mostly) are hesitant; where conflicts are
rare (0.5 %) those hesitant mistakes were most of the mined set. A class with no sample past the threshold then
gives no content: its samples would be no conflicts. Only if no class has one does every class keep its top one.

On your own data (``core.config.OWN_DATA_DEFAULTS``) the biased model trains ``classifier.epochs`` epochs and then
on, up to ``max_epochs``, while it still fits its training images (:class:`StillFitting`). Its mistakes are only
worth mining once it has fitted what its shortcut explains: a miner stopped while it still learns the images'
content finds the hard images of each class, not the conflicts (docs/experiments.md: a corner tag on Fashion-MNIST
was 20 % precise at 50 epochs, 59 % at the plateau). Where the shortcut is learnt first, as a colour is, the error
has stopped falling by ``classifier.epochs`` and nothing changes. The embedded benchmarks keep their fixed budgets.

``loss_weight_cap`` draws each mined content in proportion to its cross entropy, capped at that many nats, instead
of equally often: the loss is the biased model's evidence that a sample breaks the shortcut, so a hesitant mistake
still gives samples, only fewer. Where conflicts are rare the illegible aligned mistakes then fill less of the
synthetic set; where every content is past the cap nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .classifier import ClassifierConfig, accuracy, gce_loss, predict, train_classifier


@dataclass
class MiningConfig:
    k: int = 10  # samples kept per class (reference default)
    misclassified_only: bool = True  # of the top k, keep those the biased model predicts wrongly (paper: False)
    min_loss: float = 0.0  # of those, keep the ones whose CE exceeds this (0: off; see the module docstring)
    loss_weight_cap: float = 0.0  # > 0: draw each content in proportion to min(CE, this); 0: all equally often
    # the biased model trains on past classifier.epochs while its training error still falls (StillFitting), up to
    # this many epochs; at or below classifier.epochs (the default, 0): exactly classifier.epochs. Your own data: 300
    max_epochs: int = 0
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)  # the biased model

    def __post_init__(self):
        if isinstance(self.classifier, dict):  # from YAML / config.json
            self.classifier = ClassifierConfig(**self.classifier)
        if self.min_loss < 0:
            raise ValueError(f"mining.min_loss must be >= 0 (a cross entropy), got {self.min_loss}")
        if self.loss_weight_cap < 0:
            raise ValueError(f"mining.loss_weight_cap must be >= 0 (a cross entropy), got {self.loss_weight_cap}")

    @property
    def filters(self) -> dict:
        """The keyword arguments :func:`mine` takes from this config (every caller mines as its run does)."""
        return {"misclassified_only": self.misclassified_only, "min_loss": self.min_loss,
                "loss_weight_cap": self.loss_weight_cap}


@dataclass
class Mined:
    indices: np.ndarray  # training-set indices, grouped by class, highest loss first
    losses: np.ndarray  # per-sample CE of every training sample under the biased model
    weights: np.ndarray | None = None  # per mined index, how often it is drawn as a content (None: equally)


class StillFitting:
    """Whether the biased model still fits its training images, for :func:`train_biased`.

    Its training error is measured every ``every`` epochs counted back from ``start`` (``classifier.epochs``). From
    ``start`` on, training ends at the first check where the error did not fall by more than a tenth of itself over
    the last ``window`` epochs: the model has fitted what it is going to fit, and what it still gets wrong is what its
    shortcut cannot explain. With ``start`` at or under ``window`` there is no earlier error to compare: it ends at
    ``start``. The checks only read the model, so a run that ends at ``start`` has the weights of a fixed budget.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, start: int, device="cpu", every: int = 10,
                 window: int = 20):
        self.images, self.labels, self.start, self.device = images, labels, start, device
        self.every, self.window = every, window
        self.errors: dict[int, float] = {}  # epochs trained -> training error
        self.epochs = 0  # epochs trained so far

    def __call__(self, epoch: int, model) -> bool:
        self.epochs = done = epoch + 1
        if done < self.start - self.window or (self.start - done) % self.every:
            return False
        self.errors[done] = 1.0 - accuracy(model, self.images, self.labels, self.device)
        if done < self.start:
            return False
        before = self.errors.get(done - self.window)
        return before is None or self.errors[done] >= 0.9 * before

    def state_dict(self) -> dict:
        return {"errors": self.errors, "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.errors, self.epochs = dict(state["errors"]), state["epochs"]


@dataclass
class Biased:
    """The biased classifier and how long it trained (:class:`StillFitting`)."""

    model: torch.nn.Module
    epochs: int
    errors: dict[int, float]  # training error at each check, by epochs trained


def train_biased(images, labels, num_classes: int, cfg: MiningConfig, seed: int, device="cpu", progress=True,
                 checkpoint=None) -> Biased:
    """The GCE-trained biased classifier (no validation split: it is meant to overfit the shortcut), trained
    ``cfg.classifier.epochs`` epochs and on while it still fits, up to ``cfg.max_epochs`` (:class:`StillFitting`);
    ``checkpoint`` as :func:`~core.classifier.train_loop`'s."""
    q = cfg.classifier.gce_q
    start = cfg.classifier.epochs
    # a fixed budget (the benchmarks) trains exactly as before, without the checks' passes over the training set
    until = StillFitting(images, labels, start, device) if cfg.max_epochs > start else None
    model = train_classifier(images, labels, None, None, replace(cfg.classifier, epochs=max(start, cfg.max_epochs)),
                             num_classes, seed, loss_fn=lambda logits, y: gce_loss(logits, y, q), device=device,
                             desc="biased (GCE)", progress=progress, checkpoint=checkpoint, until=until)
    return Biased(model, start, {}) if until is None else Biased(model, until.epochs, until.errors)


def top_k_per_class(losses: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest losses within each class (all of a class if it has fewer); ties by index."""
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(-losses[members], kind="stable")]
        picked.append(order[:k])
    return np.concatenate(picked)


def mine(model, images, labels, k: int, device="cpu", *, misclassified_only: bool, min_loss: float,
         loss_weight_cap: float = 0.0) -> Mined:
    """Score every training sample by plain CE under the biased ``model`` and keep the top ``k`` per class.

    ``misclassified_only`` and ``min_loss`` (no defaults here: callers pass their ``MiningConfig.filters``) keep, of
    each class's top ``k``, those the model predicts as another class, and those whose CE exceeds ``min_loss``.
    Without ``min_loss`` a class with none of them keeps its top one, so every class still has a content; with it,
    such a class gives none (unless none has any). ``loss_weight_cap`` > 0 gives each kept index the weight
    ``min(CE, loss_weight_cap)`` (floored at 1e-3, so none is never drawn). Reads task labels only.
    """
    logits = predict(model, images, device=device)
    losses = F.cross_entropy(logits, labels, reduction="none").numpy()
    y = labels.numpy()
    picked = top_k_per_class(losses, y, k)
    passes = losses > min_loss
    if misclassified_only:
        passes &= (logits.argmax(1) != labels).numpy()
    if misclassified_only or min_loss > 0:
        groups = [picked[y[picked] == c] for c in np.unique(y)]  # each class's top k, highest loss first
        kept = [g[passes[g]] for g in groups]
        if min_loss == 0 or not any(len(g) for g in kept):
            kept = [g if len(g) else group[:1] for g, group in zip(kept, groups)]
        picked = np.concatenate(kept)
    weights = np.clip(losses[picked], 1e-3, loss_weight_cap) if loss_weight_cap > 0 else None
    return Mined(picked, losses, weights)


def difficulty(model, images, labels, device="cpu") -> torch.Tensor:
    """LfF's relative difficulty of every sample under the biased ``model``: its CE divided by the largest CE of
    its class, in [0, 1]. The samples that break the shortcut score near 1. Reads task labels only; the diffusion
    stage oversamples by it (``DiffusionConfig.hard_share``)."""
    losses = F.cross_entropy(predict(model, images, device=device), labels, reduction="none")
    top = torch.zeros(int(labels.max()) + 1).scatter_reduce(0, labels, losses, "amax")
    return losses / top[labels].clamp_min(1e-12)


def mining_quality(indices: np.ndarray, labels: torch.Tensor, bias: torch.Tensor,
                   aligned_of: torch.Tensor | None = None) -> dict[str, float]:
    """Precision and recall of the mined set against the hidden bias labels (evaluation only). A benchmark's bias
    is aligned where it equals the label; your own data's where it is its class's usual attribute (``aligned_of``,
    :func:`~core.classifier.aligned_attributes`; an unknown attribute counts as aligned)."""
    if aligned_of is None:
        conflict = (labels != bias).numpy()
    else:
        conflict = ((bias >= 0) & (aligned_of[labels] >= 0) & (bias != aligned_of[labels])).numpy()
    hits = int(conflict[indices].sum())
    return {"mined": int(len(indices)), "true_conflicts": int(conflict.sum()),
            "precision": round(100.0 * hits / max(1, len(indices)), 2),
            "recall": round(100.0 * hits / max(1, int(conflict.sum())), 2)}
