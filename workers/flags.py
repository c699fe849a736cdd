"""The command line's run settings, written once: each flag, the config key it sets and what it means.

``run`` and ``tune`` add the flags they take with :func:`add_run_flags` and turn the ones given into
:class:`~core.config.RunConfig` overrides with :func:`flag_overrides`. Each flag's help shows its default as the
registry has it (:mod:`core.config`: the dataclasses' value, and a dataset's own where its entry differs).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from diffinject.core.config import DATASET_DEFAULTS, DEFAULT_METHODS, METHODS, SEED_MAX, RunConfig
from diffinject.core.hspace import PRECISION_CHOICES


@dataclass(frozen=True)
class Flag:
    key: str  # the config key it sets, dotted: "ratio", "mining.k"
    help: str
    kind: type = str  # bool: an on/off switch (--x / --no-x)
    choices: tuple | None = None


DATASETS = ("cmnist or corrupted_mnist (embedded); colored_fmnist (Fashion-MNIST's 70,000 photographs coloured, "
            "from the IDX files in --data-root, $FASHION_MNIST or Debian's dataset-fashion-mnist); or with "
            "--data-root: cmnist, cifar10c, bffhq, dogs_and_cats")
RUN_FLAGS: dict[str, Flag] = {
    "data": Flag("data", "your own images: a folder (train/<class>/..., optional val/ and test/; or Hugging Face "
                         "imagefolder) or a CSV manifest file,label[,split][,attribute]"),
    "attributes": Flag("attributes", "with --data: a CSV file,attribute of bias attributes, for evaluation only"),
    "skip_unreadable": Flag("skip_unreadable", "with --data: skip (and count) images that cannot be read, instead of "
                                               "refusing them", bool),
    "valid_share": Flag("valid_share", "with --data and no val/ split: the share of train carved into one", float),
    "dataset": Flag("dataset", DATASETS),
    "data_root": Flag("data_root", "folder holding the released benchmark copies"),
    "ratio": Flag("ratio", "percent of bias-conflicting training samples: 0.5, 1, 2 or 5", float),
    "methods": Flag("methods", f"comma list of rows to make, of {', '.join(METHODS)}"),
    "unet": Flag("unet", "the label-free row's U-Net: a trained folder, a hub id, or 'shipped' (the project's for "
                         "this embedded dataset and ratio, else one trained here)"),
    "seed": Flag("seed", "every stage's randomness", int),
    "data_seed": Flag("data_seed", "the embedded data's draw", int),
    "image_size": Flag("image_size", "resize images on load (--data, --data-root); --data's default: 32", int),
    "k": Flag("mining.k", "mined samples per class", int),
    "misclassified_only": Flag("mining.misclassified_only", "of the top K, keep those the biased model gets wrong",
                               bool),
    "min_loss": Flag("mining.min_loss", "of those, keep the ones whose loss under the biased model exceeds this "
                                        "(0: off)", float),
    "loss_weight_cap": Flag("mining.loss_weight_cap", "draw each mined image in proportion to its loss under the "
                                                      "biased model, capped at this (0: all equally often)", float),
    "gamma": Flag("injection.gamma", "injection strength in [0, 1]", float),
    "t_edit": Flag("injection.t_edit", "inject at the generation steps with t >= t_edit", int),
    "steps": Flag("injection.steps", "DDIM steps for inversion and generation", int),
    "skip_levels": Flag("injection.skip_levels", "also inject the skip connections of the N coarsest up blocks",
                        int),
    "synthetic_ratio": Flag("injection.synthetic_ratio", "synthetic samples per training image", float),
    "num_samples": Flag("injection.num_samples", "number of synthetic samples (overrides --synthetic-ratio)", int),
    "label_from": Flag("injection.label_from", "which image gives a synthetic sample its label", str,
                       ("content", "style")),
    "precision": Flag("injection.precision", "the U-Net's number format in generation (auto: bf16 where the CPU "
                                             "has bf16 arithmetic)", str, PRECISION_CHOICES),
    "compile": Flag("injection.compile", "torch.compile the U-Net for generation: pays on large runs and from a "
                                         "machine's second run", bool),
    "diffusion_steps": Flag("diffusion.steps", "training steps of a U-Net trained here", int),
    "hard_share": Flag("diffusion.hard_share", "share of each U-Net training batch drawn by the biased model's "
                                               "difficulty (0: uniform)", float),
    "epochs": Flag("classifier.epochs", "epochs of every debiased classifier", int),
}


def flag_of(key: str) -> str | None:
    """The flag that sets a config key (``classifier.epochs`` -> ``--epochs``), or None where none does."""
    return next(("--" + name.replace("_", "-") for name, flag in RUN_FLAGS.items() if flag.key == key), None)


def at_least(lo: float, kind: type = int, strict: bool = False):
    """An argparse type: a ``kind`` number no smaller than ``lo`` (above it, with ``strict``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value < lo or (strict and value == lo):
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if strict else 'at least'} {lo:g}")
        return value

    return parse


def seed_value(text: str) -> int:
    """An argparse type: a seed, a whole number in [0, 2^63 - 1] as the registry's ranges say."""
    value = at_least(0)(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is above {SEED_MAX}")
    return value


def _get(tree: dict, path: list[str]):
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def default_of(key: str, defaults: dict) -> str:
    """A config key's default as help text: its value in ``defaults`` (``RunConfig().to_dict()``), then each
    dataset's own where it differs."""
    path = key.split(".")
    base = _get(defaults, path)
    text = ", ".join(DEFAULT_METHODS) if key == "methods" else _show(base)
    own = [f"{name}: {_show(value)}" for name, entry in DATASET_DEFAULTS.items()
           if (value := _get(entry, path)) is not None and value != base]
    return f"{text}; {'; '.join(own)}" if own else text


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def add_run_flags(parser: argparse.ArgumentParser, names) -> None:
    """Add the :data:`RUN_FLAGS` named in ``names`` to ``parser``, each unset (None) unless given."""
    defaults = RunConfig().to_dict()
    for name in names:
        flag = RUN_FLAGS[name]
        option = "--" + name.replace("_", "-")
        help_text = f"{flag.help} (default: {default_of(flag.key, defaults)})"
        if flag.kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(option, type=flag.kind, choices=flag.choices, default=None, help=help_text)


def flag_overrides(args: argparse.Namespace) -> dict:
    """RunConfig overrides from the :data:`RUN_FLAGS` given (one a command lacks, or left unset, is skipped);
    ``--train-unet`` sets ``unet`` to None (train one here)."""
    over: dict = {}
    for name, flag in RUN_FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        *sections, key = flag.key.split(".")
        node = over
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value.split(",") if name == "methods" else value
    if getattr(args, "train_unet", False):
        over["unet"] = None
    return over
