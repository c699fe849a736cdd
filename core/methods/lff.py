"""LfF, Learning from Failure (Nam et al., NeurIPS 2020): a GCE-trained biased model and a debiased model trained
together; each sample's cross entropy in the debiased model is weighted by its relative difficulty
W = L_b / (L_b + L_d), from per-sample loss averages normalised by their class maximum.

On real + synthetic data (``lff+diffinject``) the biased model learns from the real samples only: the synthetic
samples are bias-conflicting by design, and learning from them teaches the biased model against the bias it is there
to capture. It still scores them, so they are weighted as the real samples are."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..classifier import as_float, build_classifier, check_arch, gce_loss, train_loop
from .base import LossEMA, Method, Trained, difficulty_weights


@dataclass
class LfFParams:
    ema_alpha: float = 0.7  # the loss averages' decay (reference: 0.7)
    cap_extra_weight: bool = False  # extra (synthetic) samples hold at most their share of a batch's weight
    # the biased model's architecture ("mlp", "cnn", ...) where it should differ from the debiased model's (None: the
    # same): a texture bias needs the CNN to learn the shortcut (core.config.DATASET_DEFAULTS)
    biased_arch: str | None = None
    biased_learns_extra: bool = True  # the biased model's GCE loss takes the extra (synthetic) samples too

    def __post_init__(self):  # refused when the run is configured, before any stage
        if self.biased_arch is not None:
            check_arch(self.biased_arch, "biased_arch")


class LfF(Method):
    name, label, Params = "lff", "LfF", LfFParams

    def fit(self, train, valid, num_classes, cfg, seed, device="cpu", progress=True, on_epoch=None,
            checkpoint=None) -> Trained:
        torch.manual_seed(seed)
        shape = tuple(train.images.shape[1:])
        cfg_b = cfg if self.params.biased_arch is None else replace(cfg, arch=self.params.biased_arch)
        model_b = build_classifier(cfg_b, shape, num_classes).to(device)
        model_d = build_classifier(cfg, shape, num_classes).to(device)
        opt_b = torch.optim.Adam(model_b.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt_d = torch.optim.Adam(model_d.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        ema_b, ema_d = LossEMA(train.labels, self.params.ema_alpha), LossEMA(train.labels, self.params.ema_alpha)
        from_extra = train.extras.get("from_extra", torch.zeros(len(train), dtype=torch.bool))

        def step(idx, _):
            x, y = as_float(train.images[idx]).to(device), train.labels[idx].to(device)
            logit_b, logit_d = model_b(x), model_d(x)
            ce_d = F.cross_entropy(logit_d, y, reduction="none")
            ema_b.update(F.cross_entropy(logit_b, y, reduction="none"), idx)
            ema_d.update(ce_d, idx)
            w = self.weights(ema_b, ema_d, idx, from_extra[idx]).to(device)
            if self.params.biased_learns_extra:  # the batch mean, so plain LfF rounds as it always did
                loss_b = gce_loss(logit_b, y, cfg.gce_q)
            else:
                loss_b = biased_loss(logit_b, y, cfg.gce_q, ~from_extra[idx].to(device))
            loss = (ce_d * w).mean() + loss_b
            opt_b.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_b.step()
            opt_d.step()

        state = {"model_b": model_b, "opt_b": opt_b, "opt_d": opt_d, "ema_b": ema_b, "ema_d": ema_d}
        model = train_loop(model_d, len(train), cfg, seed, step, valid.images, valid.labels, device, self.name,
                           progress, on_epoch, checkpoint=checkpoint, state=state)
        return Trained(model)

    def weights(self, ema_b: LossEMA, ema_d: LossEMA, idx: torch.Tensor, from_extra: torch.Tensor) -> torch.Tensor:
        """A batch's per-sample loss weights (``benchmarks/lff_weights.py`` wraps this to tally them)."""
        return difficulty_weights(ema_b, ema_d, idx, from_extra, self.params.cap_extra_weight)


def biased_loss(logits: torch.Tensor, targets: torch.Tensor, q: float, learns: torch.Tensor) -> torch.Tensor:
    """The biased model's GCE, averaged over the batch's samples it learns from (``learns``); 0 where there are none
    (a batch of synthetic samples only), with no gradient from the others."""
    gce = gce_loss(logits, targets, q, reduction="none")
    return (gce * learns).sum() / learns.sum().clamp_min(1)
