"""Can the debiased classifier tell synthetic from real samples, and does it matter? (FFR, arXiv 2308.04553)

A known failure of training on real + synthetic data is that the classifier learns "synthetic or real" as a
shortcut: it fits the synthetic bias-conflict samples by their generator artefacts and keeps the bias shortcut for
real images. For one finished run folder and each synthetic row, this measures:

* **probe**: a logistic-regression probe on the classifier's penultimate features, trained on half of the real
  training images and half of the synthetic samples, tested on the other halves (50 % = cannot tell them apart);
* **pixels**: the same MLP architecture trained from scratch on raw pixels to separate them (what is available
  to be learnt at all);
* **fit**: the classifier's accuracy on its own synthetic samples against its accuracy on the real bias-conflicting
  test images (a large gap means the synthetic samples were fitted without the lesson carrying over to real ones).

    python benchmarks/synthetic_shortcut.py runs/bench/default-1pct-seed0 [more run folders]

Prints one JSON line per (run, row) and writes ``benchmarks/results/synthetic_shortcut.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


from debias_table import command_line  # sibling script (its folder is on sys.path)
from diffinject.core.classifier import ClassifierConfig, as_float, build_classifier, predict, train_classifier
from diffinject.core.data import load_dataset
from diffinject.core.injection import Synthetic
from diffinject.core.config import SYNTHETIC_ROWS
from diffinject.core.run import saved_config

RESULTS = Path(__file__).parent / "results"


def features(model, images: torch.Tensor) -> torch.Tensor:
    """The penultimate layer of the LfF MLP (16 units), for uint8 images."""
    with torch.no_grad():
        return model.net[:-1](as_float(images))


def probe_accuracy(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, steps: int = 500) -> float:
    """Held-out accuracy of a logistic regression separating two feature sets (balanced by subsampling)."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(real), len(fake))
    real, fake = real[torch.randperm(len(real), generator=g)[:n]], fake[torch.randperm(len(fake), generator=g)[:n]]
    x, y = torch.cat([real, fake]), torch.cat([torch.zeros(n), torch.ones(n)])
    order = torch.randperm(2 * n, generator=g)
    train, test = order[: n], order[n:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x[train] @ w + b, y[train]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return round(100.0 * ((x[test] @ w + b > 0).float() == y[test]).float().mean().item(), 2)


def pixel_accuracy(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> float:
    """Held-out accuracy of the MLP trained from scratch on raw pixels to separate real from synthetic images."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(real), len(fake))
    real, fake = real[torch.randperm(len(real), generator=g)[:n]], fake[torch.randperm(len(fake), generator=g)[:n]]
    x, y = torch.cat([real, fake]), torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    order = torch.randperm(2 * n, generator=g)
    train, test = order[: n], order[n:]
    model = train_classifier(x[train], y[train], None, None, ClassifierConfig(arch="mlp", epochs=20), 2, seed,
                             progress=False)
    return round(100.0 * (predict(model, x[test]).argmax(1) == y[test]).float().mean().item(), 2)


def measure(folder: Path) -> list[dict]:
    cfg = saved_config(folder)
    ds = load_dataset(cfg.dataset, cfg.ratio, cfg.data_root, cfg.data_seed, cfg.image_size)
    rows = []
    for method, (_, synthetic_dir) in SYNTHETIC_ROWS.items():
        weights = folder / "classifiers" / f"{method}.pt"
        if not weights.exists():
            continue
        model = build_classifier(cfg.classifier, ds.image_shape, ds.num_classes)
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        syn = Synthetic.load(folder / synthetic_dir / "samples.pt")
        te = ds.test
        conflicting = te.labels != te.bias  # evaluation only
        rows.append({
            "run": str(folder), "method": method,
            "probe_real_vs_synthetic": probe_accuracy(features(model, ds.train.images), features(model, syn.images)),
            "pixels_real_vs_synthetic": pixel_accuracy(ds.train.images, syn.images),
            "accuracy_on_own_synthetic": round(100.0 * (predict(model, syn.images).argmax(1) == syn.labels)
                                               .float().mean().item(), 2),
            "accuracy_on_real_conflicting_test": round(100.0 * (predict(model, te.images[conflicting]).argmax(1)
                                                                == te.labels[conflicting]).float().mean().item(), 2),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished run folders")
    p.add_argument("--out", default=str(RESULTS / "synthetic_shortcut.json"))
    args = p.parse_args()
    rows = [row for folder in args.runs for row in measure(Path(folder))]
    Path(args.out).write_text(json.dumps({"command": command_line(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
