"""DisEnt, Learning Debiased Representation via Disentangled Feature Augmentation (Lee et al., NeurIPS 2021).

Two encoders of the shared backbone: an intrinsic one E_i and a bias one E_b, with linear classifiers C_i and C_b on
the concatenated features z = [z_i, z_b]. Each classifier's gradient reaches only its own encoder (the other half of
z is detached). C_b is trained with GCE, so E_b takes the shortcut; C_i with cross entropy weighted by LfF's relative
difficulty W = L_b / (L_b + L_i) from class-normalised per-sample loss averages (Eq. 1-2). After a warm-up
(``swap_after`` of the training), z_b is permuted within the batch, z_swap = [z_i, z_b[perm]], and both classifiers
also learn from it: C_i keeps the sample's label (the bias features now belong to another sample), C_b takes the
label of the sample whose bias features it got (Eq. 3), weighted by ``lambda_swap`` (Eq. 4).

The loss weights and the schedule are the reference's Colored MNIST settings (``lambda_dis_align`` 10,
``lambda_swap_align`` 10, ``lambda_swap`` 1; swapping and halving the learning rate after 10,000 of 50,000 steps,
then every 10,000), with the schedule as fractions of our epochs budget. Predictions are C_i([E_i(x), E_b(x)]),
as in the reference's evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..classifier import ClassifierConfig, as_float, build_encoder, gce_loss, train_loop
from .base import LossEMA, Method, Trained, difficulty_weights


@dataclass
class DisEntParams:
    lambda_dis_align: float = 10.0  # GCE weight of C_b on real features (Eq. 2)
    lambda_swap_align: float = 10.0  # GCE weight of C_b on swapped features (Eq. 3)
    lambda_swap: float = 1.0  # weight of the swap loss (Eq. 4)
    swap_after: float = 0.2  # share of the training steps before swapping starts (reference: 10k of 50k)
    lr_decay_every: float = 0.2  # after swapping starts, halve the learning rate every this share of the steps
    lr_gamma: float = 0.5
    ema_alpha: float = 0.7
    lr: float | None = None  # None: the shared ClassifierConfig.lr (reference on Colored MNIST: 0.01 over 50k steps)
    cap_extra_weight: bool = False  # extra (synthetic) samples hold at most their share of a batch's weight


class DisEntClassifier(nn.Module):
    """E_i and E_b with both classifiers; ``forward`` is the intrinsic prediction C_i([z_i, z_b])."""

    def __init__(self, cfg: ClassifierConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.intrinsic, dim = build_encoder(cfg, image_shape)
        self.bias, _ = build_encoder(cfg, image_shape)
        self.fc_intrinsic = nn.Linear(2 * dim, num_classes)
        self.fc_bias = nn.Linear(2 * dim, num_classes)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.intrinsic(x), self.bias(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_intrinsic(torch.cat(self.features(x), dim=1))


def swap_features(z_i: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor):
    """DisEnt's feature augmentation: ``([z_i, z_b[perm]] with z_b detached, [z_i detached, z_b[perm]],
    labels, labels[perm])``: the intrinsic classifier keeps each sample's label, the bias one takes the label of
    the sample whose bias features it now sees."""
    z_swap = z_b[perm]
    return (torch.cat([z_i, z_swap.detach()], 1), torch.cat([z_i.detach(), z_swap], 1), labels, labels[perm])


class DisEnt(Method):
    name, label, Params = "disent", "DisEnt", DisEntParams

    def build(self, cfg, image_shape, num_classes):
        return DisEntClassifier(cfg, image_shape, num_classes)

    def fit(self, train, valid, num_classes, cfg, seed, device="cpu", progress=True, on_epoch=None,
            checkpoint=None) -> Trained:
        p = self.params
        torch.manual_seed(seed)
        model = self.build(cfg, tuple(train.images.shape[1:]), num_classes).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=p.lr or cfg.lr, weight_decay=cfg.weight_decay)
        total = cfg.epochs * -(-len(train) // cfg.batch_size)
        swap_from, decay_every = int(p.swap_after * total), max(1, int(p.lr_decay_every * total))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=decay_every, gamma=p.lr_gamma)
        ema_i, ema_b = LossEMA(train.labels, p.ema_alpha), LossEMA(train.labels, p.ema_alpha)
        perm_gen = torch.Generator().manual_seed(seed + 1)
        from_extra = train.extras.get("from_extra", torch.zeros(len(train), dtype=torch.bool))

        def step(idx, i):
            x, y = as_float(train.images[idx]).to(device), train.labels[idx].to(device)
            z_i, z_b = model.features(x)
            pred_i = model.fc_intrinsic(torch.cat([z_i, z_b.detach()], 1))
            pred_b = model.fc_bias(torch.cat([z_i.detach(), z_b], 1))
            ce_i = F.cross_entropy(pred_i, y, reduction="none")
            ema_i.update(ce_i, idx)
            ema_b.update(F.cross_entropy(pred_b, y, reduction="none"), idx)
            w = difficulty_weights(ema_b, ema_i, idx, from_extra[idx], p.cap_extra_weight).to(device)
            loss = (ce_i * w).mean() + p.lambda_dis_align * gce_loss(pred_b, y, cfg.gce_q)
            if i > swap_from:
                perm = torch.randperm(len(idx), generator=perm_gen).to(device)
                mix_i, mix_b, y_i, y_b = swap_features(z_i, z_b, y, perm)
                loss_swap = ((F.cross_entropy(model.fc_intrinsic(mix_i), y_i, reduction="none") * w).mean()
                             + p.lambda_swap_align * gce_loss(model.fc_bias(mix_b), y_b, cfg.gce_q))
                loss = loss + p.lambda_swap * loss_swap
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= swap_from:
                sched.step()

        state = {"opt": opt, "sched": sched, "ema_i": ema_i, "ema_b": ema_b, "perm_gen": perm_gen}
        model = train_loop(model, len(train), cfg, seed, step, valid.images, valid.labels, device, self.name,
                           progress, on_epoch, checkpoint=checkpoint, state=state)
        return Trained(model)
