"""Stage 4 and the baselines, trained in one harness with the same classifier:

* ``vanilla``    plain cross entropy on the training set;
* ``lff``        Learning from Failure: a GCE biased model and a debiased model trained together, each sample
                 weighted by its relative difficulty W = CE_b / (CE_b + CE_d) (per-sample EMA of the losses,
                 normalised by the class maximum);
* ``diffinject`` plain cross entropy on the training set plus the synthetic samples (``diffinject-corpus``: the
                 same from the corpus U-Net);
* ``oracle``     the ceiling: plain cross entropy plus *real* digits redrawn with another class's bias value.
                 It uses bias knowledge and is reported only as a ceiling, never as a method.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .classifier import ClassifierConfig, accuracy, as_float, build_classifier, gce_loss, train_classifier


def train_vanilla(train, valid, num_classes, cfg: ClassifierConfig, seed, device="cpu", progress=True):
    return train_classifier(train.images, train.labels, valid.images, valid.labels, cfg, num_classes, seed,
                            device=device, desc="vanilla", progress=progress)


def train_with_extra(train, extra_images, extra_labels, valid, num_classes, cfg, seed, desc, device="cpu",
                     progress=True, on_epoch=None):
    """Cross entropy on the training set plus extra (synthetic or oracle) samples."""
    images = torch.cat([train.images, extra_images])
    labels = torch.cat([train.labels, extra_labels])
    return train_classifier(images, labels, valid.images, valid.labels, cfg, num_classes, seed, device=device,
                            desc=desc, progress=progress, on_epoch=on_epoch)


def train_lff(train, valid, num_classes, cfg: ClassifierConfig, seed, ema_alpha: float = 0.7, device="cpu",
              progress=True):
    """LfF (Nam et al., 2020). Returns the debiased model at its best validation epoch."""
    torch.manual_seed(seed)
    shape = tuple(train.images.shape[1:])
    model_b = build_classifier(cfg, shape, num_classes).to(device)
    model_d = build_classifier(cfg, shape, num_classes).to(device)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.Adam(model_d.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, labels = len(train.labels), train.labels
    ema_b, ema_d = torch.zeros(n), torch.zeros(n)
    g = torch.Generator().manual_seed(seed)
    best, best_acc = None, -1.0
    for epoch in tqdm(range(cfg.epochs), desc="lff", disable=not progress, dynamic_ncols=True, leave=False):
        model_b.train()
        model_d.train()
        order = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x, y = as_float(train.images[idx]).to(device), labels[idx].to(device)
            logit_b, logit_d = model_b(x), model_d(x)
            ce_b = F.cross_entropy(logit_b, y, reduction="none").detach().cpu()
            ce_d = F.cross_entropy(logit_d, y, reduction="none").detach().cpu()
            ema_b[idx] = ema_alpha * ema_b[idx] + (1 - ema_alpha) * ce_b
            ema_d[idx] = ema_alpha * ema_d[idx] + (1 - ema_alpha) * ce_d
            lb, ld = ema_b[idx].clone(), ema_d[idx].clone()
            for c in y.unique().cpu():
                members = labels == c
                lb[y.cpu() == c] /= ema_b[members].max().clamp_min(1e-8)
                ld[y.cpu() == c] /= ema_d[members].max().clamp_min(1e-8)
            w = (lb / (lb + ld + 1e-8)).to(device)
            loss = (F.cross_entropy(logit_d, y, reduction="none") * w).mean() + gce_loss(logit_b, y, cfg.gce_q)
            opt_b.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_b.step()
            opt_d.step()
        acc = accuracy(model_d, valid.images, valid.labels, device)
        if acc > best_acc:
            best, best_acc = copy.deepcopy(model_d.state_dict()), acc
    model_d.load_state_dict(best)
    return model_d.eval()


def oracle_samples(dataset: str, train, count: int, seed: int):
    """``count`` real training digits redrawn with the bias value of another class (the embedded benchmarks only:
    a colour on Colored MNIST, a corruption on Corrupted MNIST).

    Uses the benchmark's bias function, i.e. bias knowledge: for the ceiling row only.
    """
    from .data import EMBEDDED

    if "grey" not in train.extras or dataset not in EMBEDDED:
        raise ValueError("the oracle ceiling needs an embedded benchmark (its grey digits and bias function)")
    rng = np.random.default_rng([seed, 7])
    idx = rng.choice(len(train.labels), size=count, replace=count > len(train.labels))
    labels = train.labels[idx].numpy()
    bias = (labels + rng.integers(1, 10, size=count)) % 10
    images = EMBEDDED[dataset](train.extras["grey"][idx, 0].numpy(), bias, rng)
    return torch.from_numpy(images), torch.from_numpy(labels)
