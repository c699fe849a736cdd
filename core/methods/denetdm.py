"""DeNetDM, Debiasing by Network Depth Modulation (Sreelatha et al., NeurIPS 2024; reference code
kadarsh22/DeNetDM, read for its facts).

A deep and a shallow branch share one linear head and are trained together as a product of experts: the logits are
``head(shallow(x) + deep(x))`` under plain cross entropy. The deep branch, which learns the easy shortcut first,
takes the bias; the shallow one is left the rest. Stage 2 trains a new branch as deep as the bias one (the
*target*) beside the frozen deep branch, again as a product of experts, plus a distillation from stage 1's shallow
branch (its prediction ``head(shallow(x))`` is the teacher, at temperature T):

    L2 = poe_weight * CE(head(target(x) + deep(x)), y) + dist_weight * T^2 * CE(softmax(t / T), log_softmax(s / T))

The classifier is ``head(target(x))``. The head is trained in both stages (stage 2 starts from stage 1's).

The branches: on the MLP (Colored MNIST), Linear+ReLU layers of width 100, the shallow branch 2 of them and the deep
4, as the reference's (3 and 5 counting the head). On the CNN and ResNet-18, the deep branch is the classifier's own
encoder (``build_encoder``) and the shallow one a single strided 3x3 convolution, pooled and projected to the
deep branch's width: our choice, as our convolutional classifiers are not the reference's. Every model is chosen on
the validation split by its own prediction (stage 1: the shallow branch; stage 2: the target), task labels only: the
reference chose on bias-labelled validation data. Each stage gets the shared ``ClassifierConfig`` budget (epochs,
batch size, learning rate); stage 1's weight decay is the reference's 1e-3, stage 2's none.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..classifier import ClassifierConfig, as_float, build_encoder, resolve_arch, train_loop
from .base import Method, Trained

WIDTH = 100  # the reference's Colored MNIST branch width


@dataclass
class DeNetDMParams:
    shallow_depth: int = 2  # the MLP's shallow branch: Linear+ReLU layers (the reference's Colored MNIST: 2)
    deep_depth: int = 4  # the MLP's deep (bias) and target branches (the reference: 4)
    temperature: float = 2.0  # T of stage 2's distillation
    poe_weight: float = 1.0
    dist_weight: float = 1.0
    stage1_weight_decay: float = 1e-3

    def __post_init__(self):
        if self.shallow_depth < 1 or self.deep_depth <= self.shallow_depth:
            raise ValueError(f"DeNetDM needs 1 <= shallow_depth < deep_depth, got {self.shallow_depth}, "
                             f"{self.deep_depth}")
        if self.temperature <= 0:
            raise ValueError(f"DeNetDM's temperature must be > 0, got {self.temperature}")


def mlp_branch(in_features: int, depth: int) -> nn.Module:
    layers = [nn.Flatten(), nn.Linear(in_features, WIDTH), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers)


def conv_shallow(channels: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 32, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, dim))


def branches(cfg: ClassifierConfig, image_shape: tuple[int, int, int],
             p: DeNetDMParams) -> tuple[nn.Module, nn.Module, int]:
    """A fresh ``(shallow, deep, feature width)`` for the classifier architecture of ``cfg``."""
    c, h, w = image_shape
    if resolve_arch(cfg.arch, h) == "mlp":
        return mlp_branch(c * h * w, p.shallow_depth), mlp_branch(c * h * w, p.deep_depth), WIDTH
    deep, dim = build_encoder(cfg, image_shape)
    return conv_shallow(c, dim), deep, dim


class TwoBranch(nn.Module):
    """Two branches on one head: ``forward`` is the first branch's prediction ``head(first(x))``, :meth:`experts`
    the product of experts ``head(first(x) + second(x))``. Stage 1: (shallow, deep); stage 2 and the classifier
    kept: (target, deep)."""

    def __init__(self, first: nn.Module, second: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.first, self.second, self.head = first, second, nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.first(x))

    def experts(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.first(x) + self.second(x))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference's distillation: T^2 times the mean over the batch of the cross entropy between the teacher's
    and the student's softened distributions (the same gradient as the KL divergence)."""
    soft_targets = F.softmax(teacher / temperature, dim=1)
    return -(soft_targets * F.log_softmax(student / temperature, dim=1)).sum(1).mean() * temperature ** 2


class DeNetDM(Method):
    name, label, Params = "denetdm", "DeNetDM", DeNetDMParams

    def build(self, cfg, image_shape, num_classes):
        _, deep, dim = branches(cfg, image_shape, self.params)
        target = branches(cfg, image_shape, self.params)[1]
        return TwoBranch(target, deep, dim, num_classes)

    def fit(self, train, valid, num_classes, cfg, seed, device="cpu", progress=True, on_epoch=None,
            checkpoint=None) -> Trained:
        p, shape = self.params, tuple(train.images.shape[1:])

        def batch(idx):
            return as_float(train.images[idx]).to(device), train.labels[idx].to(device)

        # stage 1: the shallow and the deep branch as a product of experts, chosen by the shallow branch alone
        torch.manual_seed(seed)
        shallow, deep, dim = branches(cfg, shape, p)
        first = TwoBranch(shallow, deep, dim, num_classes).to(device)
        opt1 = torch.optim.Adam(first.parameters(), lr=cfg.lr, weight_decay=p.stage1_weight_decay)

        def step1(idx, _):
            x, y = batch(idx)
            loss = F.cross_entropy(first.experts(x), y)
            opt1.zero_grad(set_to_none=True)
            loss.backward()
            opt1.step()

        first = train_loop(first, len(train), cfg, seed, step1, valid.images, valid.labels, device,
                           "denetdm (stage 1)", progress, checkpoint=checkpoint, state={"opt": opt1})

        # stage 2: a new deep target branch beside the frozen deep one, distilled from the shallow branch
        torch.manual_seed(seed + 1)
        target = branches(cfg, shape, p)[1]
        model = TwoBranch(target, copy.deepcopy(first.second), dim, num_classes).to(device)
        model.head.load_state_dict(first.head.state_dict())
        model.second.requires_grad_(False)
        opt2 = torch.optim.Adam([*model.first.parameters(), *model.head.parameters()], lr=cfg.lr)

        def step2(idx, _):
            x, y = batch(idx)
            model.second.eval()  # frozen, batch statistics included
            with torch.no_grad():
                teacher = first(x)
            loss = (p.poe_weight * F.cross_entropy(model.experts(x), y)
                    + p.dist_weight * distillation_loss(model(x), teacher, p.temperature))
            opt2.zero_grad(set_to_none=True)
            loss.backward()
            opt2.step()

        model = train_loop(model, len(train), replace(cfg, weight_decay=0.0), seed, step2, valid.images,
                           valid.labels, device, self.name, progress, on_epoch, checkpoint=checkpoint,
                           state={"opt": opt2})
        return Trained(model)
