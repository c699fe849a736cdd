"""A run's settings: :class:`RunConfig`, the presets and the per-dataset defaults, in one place.

A config is built in layers, each over the one before (:func:`make_config`):

1. the dataclasses' defaults: the everyday run (the ``default`` preset is empty);
2. :data:`DATASET_DEFAULTS`: what one dataset needs other than that, whenever that dataset is used; on your own
   images, :data:`OWN_DATA_DEFAULTS` and the :data:`SIZE_DEFAULTS` row of their size instead;
3. the preset (:data:`PRESETS`);
4. the user's settings: a YAML file, then the command line's flags.

``docs/results.md`` has the measurements behind each default.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import torch

from . import methods as registry
from .classifier import ClassifierConfig
from .data import Dataset, load_dataset
from .folders import DEFAULT_IMAGE_SIZE, data_name, load_folder
from .diffusion import DiffusionConfig
from .hspace import SettingError
from .injection import InjectionConfig
from .mining import MiningConfig

# Synthetic samples per training image in the everyday run. The published tables use 1.0 (the "table" preset);
# changing this one value changes the everyday run.
EVERYDAY_SYNTHETIC_RATIO = 0.4

# The rows a run makes when the config names none, on every dataset: the baselines, the label-free method and the
# oracle ceiling (where the bias can be undone by hand). Any other registered method joins with --methods.
DEFAULT_METHODS = ("vanilla", "lff", "diffinject", "oracle")
METHODS = tuple(registry.REGISTRY)  # every row a run can make (core/methods: one class each)

# The synthetic sources a method's ``extra`` can name, each with its folders in a run (U-Net, samples): the label-free
# U-Net's samples, and the corpus U-Net's (built with knowledge of the bias, so reported as its own row)
SYNTHETIC_ROWS = {"diffinject": ("unet", "synthetic"), "diffinject-corpus": ("unet-corpus", "synthetic-corpus")}

SHIPPED = "shipped"  # RunConfig.unet value: core/pretrained/<dataset>-<pct> (embedded data), else train one


@dataclass
class RunConfig:
    """Everything that decides a run's results. Its defaults are the ``default`` preset's."""

    dataset: str = "cmnist"  # an embedded benchmark, a released one (with data_root), or the name of your own data
    # your own images: a folder (ImageFolder, Hugging Face imagefolder) or a CSV manifest (core.folders)
    data: str | None = None
    attributes: str | None = None  # with data: a CSV file,attribute of bias attributes, for evaluation only
    data_root: str | None = None  # None: the embedded data
    ratio: float = 1.0  # percent of bias-conflicting training samples: 0.5, 1, 2, 5 (benchmarks)
    data_seed: int = 0  # the embedded data's draw; with data, the validation share carved from train
    # images resized on load: released benchmarks' native size by default, your own data's core.folders.DEFAULT_IMAGE_SIZE
    image_size: int | None = None
    valid_share: float = 0.1  # with data and no validation split: the share of train carved into one, by class
    skip_unreadable: bool = False  # with data: skip (and count) images Pillow cannot read, instead of refusing them
    seed: int = 0  # every stage's randomness
    # the label-free row's U-Net: "shipped" (core/pretrained/<dataset>-<pct> where the project ships one for the
    # embedded data, else trained here), a U-Net folder, or None: train one on the training split
    unet: str | None = SHIPPED
    methods: tuple[str, ...] | None = None  # None: DEFAULT_METHODS
    hparams: dict = field(default_factory=dict)  # method name -> its hyperparameters over the registry's defaults
    mining: MiningConfig = field(default_factory=MiningConfig)
    # a U-Net trained in a run draws half of each batch by the biased model's difficulty (task labels only);
    # DiffusionConfig alone (train-diffusion, no biased model) draws uniformly
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(hard_share=0.5))
    injection: InjectionConfig = field(
        default_factory=lambda: InjectionConfig(synthetic_ratio=EVERYDAY_SYNTHETIC_RATIO))
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self):
        self.methods = tuple(self.methods) if self.methods is not None else None
        for f in fields(self):  # nested sections may arrive as dicts (YAML, JSON)
            value = getattr(self, f.name)
            if isinstance(value, dict) and f.name in SECTIONS:
                setattr(self, f.name, SECTIONS[f.name](**value))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


SECTIONS = {"mining": MiningConfig, "diffusion": DiffusionConfig, "injection": InjectionConfig,
            "classifier": ClassifierConfig}

# What a dataset needs other than the dataclasses' defaults, applied whenever the run uses that dataset; a preset
# or the user's settings win over it.
DATASET_DEFAULTS: dict[str, dict] = {
    # the small CNN's confident mistakes are mostly the bias-conflicting digits; the MLP's are illegible aligned ones
    "cmnist": {"mining": {"k": 5, "min_loss": 4.0, "classifier": {"arch": "cnn"}}},
    # textures need the CNN (miner and LfF's biased model), and h widened to the coarsest skips carries the shape
    "corrupted_mnist": {"injection": {"skip_levels": 1},
                        "mining": {"k": 5, "min_loss": 4.0, "loss_weight_cap": 20.0, "classifier": {"arch": "cnn"}},
                        "hparams": {"lff": {"biased_arch": "cnn"}, "lff+diffinject": {"biased_arch": "cnn"}}},
    # 55,000 photographs: 2,000 steps at batch 64 show each one 2.3 times; 6,000 make more samples keep the content's
    # garment (docs/results.md, Colored Fashion-MNIST)
    "colored_fmnist": {"diffusion": {"steps": 6000}},
}

# A run on your own images (``data``): the shortcut is unknown, so no fixed epoch count is known to let the biased
# model fit it; it trains on while it still fits its training images (core.mining.StillFitting)
OWN_DATA_DEFAULTS: dict = {"mining": {"max_epochs": 300}}

# A run on your own images chooses its models by image size: the first row at or above the size, else the
# last. The U-Net keeps h at 4 x 4 with attention at the two coarsest levels (as the 32 px default); the classifiers
# are the small CNN at 32 px and ResNet-18 above.
SIZE_DEFAULTS: dict[int, dict] = {
    32: {"classifier": {"arch": "cnn"}, "mining": {"classifier": {"arch": "cnn"}}},
    64: {"classifier": {"arch": "resnet18"}, "mining": {"classifier": {"arch": "resnet18"}},
         "diffusion": {"block_out_channels": [32, 64, 128, 128, 256],
                       "down_block_types": ["DownBlock2D"] * 3 + ["AttnDownBlock2D"] * 2,
                       "up_block_types": ["AttnUpBlock2D"] * 2 + ["UpBlock2D"] * 3}},
    128: {"classifier": {"arch": "resnet18"}, "mining": {"classifier": {"arch": "resnet18"}},
          "diffusion": {"micro_batch": 16, "block_out_channels": [32, 64, 64, 128, 128, 256],
                        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D"] * 2,
                        "up_block_types": ["AttnUpBlock2D"] * 2 + ["UpBlock2D"] * 4}},
}


def size_defaults(size: int) -> dict:
    """The :data:`SIZE_DEFAULTS` row for images of ``size`` px, with the U-Net at that size."""
    row = next((SIZE_DEFAULTS[s] for s in sorted(SIZE_DEFAULTS) if s >= size), SIZE_DEFAULTS[max(SIZE_DEFAULTS)])
    return merge(row, {"diffusion": {"image_size": size}})


PRESETS: dict[str, dict] = {
    # the everyday run: the dataclasses' defaults
    "default": {},
    # the published results tables: as many synthetic samples as training images
    "table": {"injection": {"synthetic_ratio": 1.0}},
    # tests and smoke runs, about a minute: a tiny U-Net trained on the training split for a few steps (uniform
    # batches), few epochs, the default models and mining (also where the dataset's entry names others)
    "quick": {
        "unet": None,
        "methods": ["vanilla", "lff", "diffinject", "oracle"],
        "hparams": {"lff": {"biased_arch": None}, "lff+diffinject": {"biased_arch": None}},
        "mining": {"k": 5, "min_loss": 0.0, "loss_weight_cap": 0.0, "classifier": {"arch": "auto", "epochs": 4}},
        "diffusion": {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "DownBlock2D"],
                      "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "steps": 30,
                      "batch_size": 32, "checkpoint_every": 10, "hard_share": 0.0},
        "injection": {"steps": 5, "num_samples": 24, "batch_size": 16},
        "classifier": {"epochs": 4},
    },
    # the paper's reference settings (for a GPU): 1000-step DDIM, U-Net trained on the dataset itself, the plain
    # top K per class and h at the middle block (over any dataset's own entry)
    "paper": {
        "unet": None,
        "hparams": {"lff": {"biased_arch": None}, "lff+diffinject": {"biased_arch": None}},
        "mining": {"k": 10, "misclassified_only": False, "min_loss": 0.0, "loss_weight_cap": 0.0,
                   "classifier": {"arch": "auto", "epochs": 50}},
        "diffusion": {"steps": 50000, "ema_decay": 0.9999},
        "injection": {"steps": 1000, "t_edit": 500, "gamma": 0.5, "t_boost": 200, "dt_lambda": 0.9985,
                      "synthetic_ratio": 0.1, "skip_levels": 0},
        "classifier": {"epochs": 50},
    },
}


SEED_MAX = 2**63 - 1  # numpy's and torch's seeds
# Every setting's inclusive range but the injection's own (InjectionConfig.RANGES, which the service's schema states),
# by dotted key; check_settings reads it, a setting left None is not checked
_CLASSIFIER_RANGES = {"epochs": (1, 100_000), "lr": (1e-12, 10.0), "batch_size": (1, 65_536), "weight_decay": (0.0, 1.0),
                      "gce_q": (1e-3, 1.0)}
RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, SEED_MAX), "data_seed": (0, SEED_MAX), "ratio": (0.0, 100.0), "image_size": (8, 1024),
    "valid_share": (0.01, 0.5),
    "mining.k": (1, 10**6), "mining.min_loss": (0.0, 1e3), "mining.loss_weight_cap": (0.0, 1e6),
    "mining.max_epochs": (0, 100_000),
    "diffusion.image_size": (8, 1024), "diffusion.steps": (1, 10**9), "diffusion.batch_size": (1, 65_536),
    "diffusion.checkpoint_every": (1, 10**9), "diffusion.micro_batch": (1, 65_536), "diffusion.lr": (1e-12, 1.0),
    "diffusion.ema_decay": (0.0, 1.0),
    "diffusion.hard_share": (0.0, 1.0), "diffusion.num_train_timesteps": (2, 100_000),
    "diffusion.layers_per_block": (1, 16), "diffusion.norm_num_groups": (1, 1024),
    "diffusion.attention_head_dim": (1, 1024), "diffusion.beta_start": (1e-12, 1.0), "diffusion.beta_end": (1e-12, 1.0),
    "diffusion.p2_k": (1e-12, 1e3), "diffusion.p2_gamma": (0.0, 10.0),
    "injection.batch_size": (1, 65_536), "injection.num_samples": (1, 10**8),
    **{f"{section}.{name}": bounds for section in ("classifier", "mining.classifier")
       for name, bounds in _CLASSIFIER_RANGES.items()},
}


def check_settings(cfg: RunConfig) -> None:
    """Every setting's type and range, before a run loads data or writes anything: a :class:`SettingError` naming
    the first one out of range by its dotted key (``classifier.epochs``), which the CLI shows as its flag."""
    check_types(cfg.to_dict(), "config")
    for key, (lo, hi) in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None and not lo <= value <= hi:
            raise SettingError(key, f"{key} {value!r} is outside [{_num(lo)}, {_num(hi)}]")
    try:
        cfg.injection.validate()
    except SettingError as e:
        raise SettingError(f"injection.{e.field}", f"injection.{e}") from None


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def check_types(values: dict, where: str, cls: type = None, prefix: str = "") -> None:
    """A one-line ``ValueError`` naming ``where`` (a file, or "config") and the first setting of ``values`` (a
    config as a dict, or part of one) whose value is not of its field's type: a list where a mapping belongs, a
    string where a number belongs. ``hparams`` are checked against each named method's hyperparameters."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name not in values:
            continue
        value, hint, key = values[f.name], hints[f.name], prefix + f.name
        if is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {key} must be a mapping of settings, not {value!r}")
            check_types(value, where, hint, key + ".")
        elif (expected := _expected(value, hint)) is not None:
            raise ValueError(f"{where}: {key} must be {expected}, not {value!r}")
        elif key == "hparams":
            for name, params in value.items():
                if name in registry.REGISTRY and isinstance(params, dict):
                    check_types(params, where, registry.REGISTRY[name].Params, f"hparams.{name}.")


_PLURAL = {"a whole number": "whole numbers", "a number": "numbers", "a string": "strings", "true or false": "booleans"}


def _expected(value, hint) -> str | None:
    """What ``value`` should be to have type ``hint`` (a field's annotation), or None where it is."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        wants = [_expected(value, a) for a in args if a is not type(None)]
        return None if None in wants else " or ".join(wants) + (" or null" if type(None) in args else "")
    if origin in (tuple, list) or hint in (tuple, list):
        items = _PLURAL.get(_expected(object(), args[0]), "items") if args else "items"  # what an item must be
        if not isinstance(value, (list, tuple)):
            return f"a list of {items}"
        return None if all(_expected(v, args[0]) is None for v in value) or not args else f"a list of {items}"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if hint is dict or origin is dict:
        return None if isinstance(value, dict) else "a mapping"
    return None


def merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``, nested dicts merged key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_settings(path: str | Path, what: str = "config") -> dict:
    """A YAML (or JSON) file of settings, as a dict; a clear error naming ``what`` it is when it is unreadable
    or not a mapping."""
    import yaml

    try:
        over = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read {what} {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(over, dict):
        raise ValueError(f"{what} {path} must be a mapping of settings")
    return over


def read_run_settings(path: str | Path) -> dict:
    """A YAML (or JSON) file of a run's settings (the keys of a run's ``config.json``), checked for unknown keys and
    types: each error is one line naming the file and the setting."""
    over = read_settings(path)
    try:
        check_keys(over, RunConfig().to_dict())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    check_types(over, str(path))
    return over


def make_config(preset: str = "default", overrides: dict | None = None) -> RunConfig:
    """The dataclasses' defaults, then the dataset's :data:`DATASET_DEFAULTS`, then the preset, then ``overrides``
    (from YAML and the command line); an unknown preset or key is a one-line error."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}")
    chosen = merge(PRESETS[preset], overrides or {})
    known = RunConfig().to_dict()
    if chosen.get("data") is not None:  # your own images: named after their folder, models chosen by image size
        chosen = {"dataset": data_name(chosen["data"]), **chosen}
        known = merge(merge(known, OWN_DATA_DEFAULTS), size_defaults(chosen.get("image_size") or DEFAULT_IMAGE_SIZE))
    dataset = chosen.get("dataset", known["dataset"])
    cfg = merge(merge(known, DATASET_DEFAULTS.get(dataset, {})), chosen)
    check_keys(cfg, known, "")
    check_types(cfg, "config")
    return RunConfig(**cfg)


def check_keys(cfg: dict, known: dict, prefix: str = "") -> None:
    """A one-line ``ValueError`` naming the first key of ``cfg`` that ``known`` (a config as a dict) lacks."""
    for k, v in cfg.items():
        if k not in known:
            raise ValueError(f"unknown config key '{prefix}{k}'")
        if isinstance(v, dict) and isinstance(known[k], dict) and k != "hparams":  # hparams: checked by validate
            check_keys(v, known[k], f"{prefix}{k}.")


def validate(cfg: RunConfig, ds: Dataset) -> None:
    """Input checks that need the data: K against class sizes, known methods, gamma."""
    cfg.injection.validate()
    smallest = int(torch.bincount(ds.train.labels).min())
    if not 1 <= cfg.mining.k <= smallest:
        raise ValueError(f"K={cfg.mining.k} is out of range: it must be between 1 and {smallest} (the smallest class)")
    methods = run_methods(cfg)
    for name in dict.fromkeys([*methods, *cfg.hparams]):  # unknown names and hyperparameters: a one-line error
        registry.get(name, cfg.hparams.get(name))
    if "diffinject-corpus" in sources_of(methods) and not _embedded_cmnist(cfg):
        raise ValueError("diffinject-corpus needs the embedded cmnist: its U-Net was pretrained on that benchmark's "
                         "colour-balanced corpus")


def _embedded_cmnist(cfg: RunConfig) -> bool:
    return cfg.dataset == "cmnist" and cfg.data_root is None and cfg.data is None


def dataset_for(cfg: RunConfig, progress: bool = False) -> Dataset:
    """The images a config names: your own (``data``), a released benchmark copy (``data_root``), or an embedded
    benchmark."""
    if cfg.data is not None:
        return load_folder(cfg.data, cfg.image_size, cfg.attributes, cfg.valid_share, cfg.data_seed,
                           cfg.skip_unreadable, progress)
    return load_dataset(cfg.dataset, cfg.ratio, cfg.data_root, cfg.data_seed, cfg.image_size)


def synthetic_source(method: str) -> str | None:
    """The synthetic source (a ``SYNTHETIC_ROWS`` key) a registered method learns from, if any."""
    extra = registry.REGISTRY[method].extra if method in registry.REGISTRY else None
    return extra if extra in SYNTHETIC_ROWS else None


def sources_of(methods) -> list[str]:
    """The synthetic sources the ``methods`` learn from, in the order first named."""
    return list(dict.fromkeys(s for s in map(synthetic_source, methods) if s is not None))


def run_methods(cfg: RunConfig) -> tuple[str, ...]:
    """The config's methods, or :data:`DEFAULT_METHODS`."""
    return cfg.methods if cfg.methods is not None else DEFAULT_METHODS
