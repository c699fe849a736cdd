"""Classifiers shared by every stage: the LfF MLP (28 px), a ResNet-18 (larger images), GCE, the training loop
with validation checkpoint selection, and the group metrics of the unbiased test split."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .artifacts import load_torch, read_checkpoint, save_torch


ARCHS = ("mlp", "cnn", "resnet18", "auto")


def check_arch(arch: str, what: str = "classifier arch") -> None:
    """Refuse an architecture name :func:`build_classifier` does not know, naming the setting (``what``)."""
    if arch not in ARCHS:
        raise ValueError(f"{what} {arch!r} must be one of {', '.join(ARCHS)}")


@dataclass
class ClassifierConfig:
    arch: str = "auto"  # "mlp" (LfF's Colored MNIST MLP), "cnn" (a small CNN), "resnet18", or "auto": mlp up to 32 px
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    gce_q: float = 0.7

    def __post_init__(self):  # refused when the run is configured, not when a stage first builds the model
        check_arch(self.arch)


class MLP(nn.Module):
    """LfF's Colored MNIST classifier: C*H*W -> 100 -> 100 -> 16 -> classes."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                                 nn.Linear(100, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (16, 32, 64 channels, the last two strided), global average pooling, a linear head:
    sees local texture (noise, blocks, blur) that an MLP on raw pixels misses, at a fraction of ResNet-18's cost."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(64, num_classes))

    def forward(self, x):
        return self.net(x)


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(y)) + self.skip(x))


class ResNet18(nn.Module):
    """ResNet-18 (torchvision's layout, written out because torchvision does not import beside our torch). Up to
    32 px its stem is the CIFAR one (a 3x3 convolution, no downsampling); above, torchvision's (7x7 stride 2 and a
    max pool), so that a 128 px image costs what a 32 px one does after the stem."""

    def __init__(self, channels: int, num_classes: int, image_size: int = 32):
        super().__init__()
        if image_size <= 32:
            self.stem = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def resolve_arch(arch: str, image_size: int) -> str:
    """The architecture ``arch`` names at this image size ("auto": the MLP up to 32 px, else ResNet-18)."""
    return arch if arch != "auto" else ("mlp" if image_size <= 32 else "resnet18")


def build_classifier(cfg: ClassifierConfig, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = image_shape
    arch = resolve_arch(cfg.arch, h)
    if arch == "mlp":
        return MLP(c * h * w, num_classes)
    if arch == "cnn":
        return SmallCNN(c, num_classes)
    if arch == "resnet18":
        return ResNet18(c, num_classes, h)
    raise AssertionError(arch)  # ClassifierConfig checked the name


def gce_loss(logits: torch.Tensor, targets: torch.Tensor, q: float = 0.7, reduction: str = "mean") -> torch.Tensor:
    """Generalized cross entropy in LfF's form: CE(p, y) * p_y.detach() ** q * q."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    p_y = F.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1).detach()
    loss = ce * p_y.pow(q) * q
    return loss.mean() if reduction == "mean" else loss


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1024, device: str = "cpu") -> torch.Tensor:
    """Logits for uint8 images, on the CPU; ``model`` is moved to ``device`` (stages load their models on the CPU)."""
    model.eval().to(device)
    out = [model(as_float(images[i : i + batch_size]).to(device)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu") -> float:
    return (predict(model, images, device=device).argmax(1) == labels).float().mean().item()


def group_metrics(pred: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor) -> dict[str, float]:
    """Unbiased (overall), bias-aligned, bias-conflicting and worst-group accuracy, in percent.

    Evaluation only: this is the one place bias labels are read.
    """
    correct = (pred == labels).float()
    aligned = labels == bias
    groups = [correct[(labels == y) & (bias == b)].mean().item()
              for y in labels.unique() for b in bias.unique() if ((labels == y) & (bias == b)).any()]
    pct = lambda v: round(100.0 * v, 2)  # noqa: E731
    return {
        "unbiased": pct(correct.mean().item()),
        "aligned": pct(correct[aligned].mean().item()) if aligned.any() else float("nan"),
        "conflicting": pct(correct[~aligned].mean().item()) if (~aligned).any() else float("nan"),
        "worst_group": pct(min(groups)),
    }


def aligned_attributes(labels: torch.Tensor, bias: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Each class's most common bias attribute among the training images whose attribute is known (-1 for a class
    with none), or None where no training image has one: what "bias-aligned" means on your own data. Evaluation
    only."""
    known = bias >= 0
    if not known.any():
        return None
    return torch.tensor([int(torch.mode(bias[known & (labels == c)]).values) if (known & (labels == c)).any() else -1
                         for c in range(num_classes)])


def own_data_metrics(pred: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor, num_classes: int,
                     aligned_of: torch.Tensor | None = None) -> dict:
    """Test metrics on your own data, in percent: accuracy, per-class and worst-class accuracy; where bias
    attributes are known (bias >= 0), group-balanced and worst-group accuracy over the (class, attribute) groups
    present, as SubpopBench reports them; with ``aligned_of`` (:func:`aligned_attributes`), bias-aligned and
    bias-conflicting accuracy. Evaluation only."""
    correct = (pred == labels).float()
    pct = lambda v: round(100.0 * float(v), 2)  # noqa: E731
    per_class = [pct(correct[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
    out = {"accuracy": pct(correct.mean()), "worst_class": min(a for a in per_class if a is not None),
           "per_class": per_class}
    known = bias >= 0
    groups = [correct[known & (labels == y) & (bias == a)].mean() for y in labels[known].unique()
              for a in bias[known].unique() if (known & (labels == y) & (bias == a)).any()]
    if groups:
        out |= {"group_balanced": pct(torch.stack(groups).mean()), "worst_group": pct(min(groups))}
    if aligned_of is not None and known.any():
        aligned = known & (bias == aligned_of[labels])
        conflicting = known & (bias != aligned_of[labels]) & (aligned_of[labels] >= 0)
        out |= {"aligned": pct(correct[aligned].mean()) if aligned.any() else None,
                "conflicting": pct(correct[conflicting].mean()) if conflicting.any() else None}
    return out


def build_encoder(cfg: ClassifierConfig, image_shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """The classifier's backbone without its last linear layer: ``(encoder, feature dimension)`` (DisEnt's E)."""
    model = build_classifier(cfg, image_shape, num_classes=1)
    if isinstance(model, ResNet18):
        dim, model.fc = model.fc.in_features, nn.Identity()
    else:  # MLP and SmallCNN end their Sequential with the head
        dim, model.net[-1] = model.net[-1].in_features, nn.Identity()
    return model, dim


def load_classifier(path: Path, cfg: ClassifierConfig, image_shape: tuple[int, int, int],
                    num_classes: int) -> nn.Module:
    """The :func:`build_classifier` model whose ``state_dict`` was saved at ``path``, in eval mode."""
    model = build_classifier(cfg, image_shape, num_classes)
    model.load_state_dict(load_torch(path))
    return model.eval()


def _state(obj):
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def _restore(obj, state) -> None:
    obj.set_state(state) if isinstance(obj, torch.Generator) else obj.load_state_dict(state)


def train_loop(model: nn.Module, n: int, cfg: ClassifierConfig, seed: int, step, valid_images=None, valid_labels=None,
               device: str = "cpu", desc: str = "classifier", progress: bool = True, on_epoch=None,
               order=None, checkpoint: Path | None = None, state: dict | None = None, until=None) -> nn.Module:
    """The epoch loop every method shares: batches of ``cfg.batch_size`` indices into ``n`` training samples, the
    checkpoint of ``model`` with the best validation accuracy kept.

    ``step(idx, i)`` trains on the batch ``idx`` (global step ``i``). ``order(epoch, generator)`` gives an epoch's
    sample order (default: a permutation of ``n`` from a generator seeded by ``seed``, so the same inputs give the
    same model). ``on_epoch(epoch, valid_accuracy)`` is called after each validated epoch (Tune reports it).
    Without a validation split the last epoch is kept. ``until(epoch, model)``, called after each epoch, ends the
    training early by returning True (the biased model's :class:`~core.mining.StillFitting`); it has ``state_dict``
    and ``load_state_dict`` and is checkpointed with the rest. Returns ``model`` in eval mode.

    ``checkpoint`` (a file) is written atomically at the end of every epoch with all the loop needs to go on: the
    epoch, the step, the epoch-order generator, torch's global RNG, the best validation weights and accuracy, and
    the state of ``model`` and of every object of ``state`` (name -> anything with ``state_dict`` and
    ``load_state_dict``, or a ``torch.Generator``: the optimizers, loss averages and generators ``step`` uses).
    Entries are kept by ``desc``, so the phases of one method (JTT's two) share a file, and one written by another
    ``n``, ``cfg`` or ``seed`` is ignored. A call that finds its entry resumes after the last complete epoch, to
    the weights of an uninterrupted run; the caller deletes the file once its result is saved.
    """
    g = torch.Generator().manual_seed(seed)
    objects = {"model": model, **(state or {}), **({"until": until} if until is not None else {})}
    key = {"n": n, "seed": seed, "cfg": asdict(cfg)}
    phases = read_checkpoint(checkpoint) if checkpoint is not None else {}
    best, best_acc, i, start = None, -1.0, 0, 0
    saved = phases.get(desc)
    if saved is not None and saved["key"] == key:
        for name, obj in objects.items():
            _restore(obj, saved["state"][name])
        g.set_state(saved["order_rng"])
        torch.set_rng_state(saved["torch_rng"])
        best, best_acc, i, start = saved["best"], saved["best_acc"], saved["step"], saved["epoch"]
        if saved.get("stopped"):  # ``until`` had ended it: nothing is left to train
            start = cfg.epochs
    for epoch in tqdm(range(start, cfg.epochs), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        model.train()
        perm = order(epoch, g) if order is not None else torch.randperm(n, generator=g)
        for batch_start in range(0, len(perm), cfg.batch_size):
            step(perm[batch_start : batch_start + cfg.batch_size], i)
            i += 1
        if valid_images is not None:
            acc = accuracy(model, valid_images, valid_labels, device)
            if acc > best_acc:
                best, best_acc = copy.deepcopy(model.state_dict()), acc
            if on_epoch is not None:
                on_epoch(epoch, acc)
        stop = until is not None and until(epoch, model)
        if checkpoint is not None:
            phases[desc] = {"key": key, "epoch": epoch + 1, "step": i, "order_rng": g.get_state(),
                            "torch_rng": torch.get_rng_state(), "best": best, "best_acc": best_acc, "stopped": stop,
                            "state": {name: _state(obj) for name, obj in objects.items()}}
            save_torch(checkpoint, phases)
        if stop:
            break
    if best is not None:
        model.load_state_dict(best)
    return model.eval()


def train_classifier(images: torch.Tensor, labels: torch.Tensor, valid_images: torch.Tensor | None,
                     valid_labels: torch.Tensor | None, cfg: ClassifierConfig, num_classes: int, seed: int,
                     loss_fn=None, device: str = "cpu", desc: str = "classifier", progress: bool = True,
                     on_epoch=None, order=None, checkpoint: Path | None = None, until=None) -> nn.Module:
    """Train a classifier on uint8 ``images`` with ``loss_fn(logits, targets)`` (default cross entropy); return
    the epoch with the best validation accuracy (see :func:`train_loop` for ``on_epoch``, ``order``,
    ``checkpoint`` and ``until``)."""
    torch.manual_seed(seed)
    model = build_classifier(cfg, tuple(images.shape[1:]), num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = loss_fn or F.cross_entropy

    def step(idx, _):
        loss = loss_fn(model(as_float(images[idx]).to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return train_loop(model, len(labels), cfg, seed, step, valid_images, valid_labels, device, desc, progress,
                      on_epoch, order, checkpoint, {"opt": opt}, until)
