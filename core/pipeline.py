"""The whole method in one run folder: mine -> diffusion -> inject -> debias, plus the peers (core/methods) beside it.

Each stage writes its artifacts atomically and is skipped when they already exist, so a rerun resumes where
the last one stopped. A run folder belongs to one config: rerunning it with another config is an error, never
an overwrite.

    run/
      config.json                 the full RunConfig
      biased/model.pt             GCE-trained biased classifier
      biased/mining.json          mined indices (top-K per class), their draw weights, mining precision/recall
      biased/mined.png            the mined samples, one row per class
      biased/model.ckpt.pt        while it trains: its state after the last complete epoch, read back by a rerun;
                                  removed once model.pt is written (core.classifier.train_loop)
      unet/                       the label-free row's U-Net (save_pretrained, safetensors) with train.json, loss.png
      synthetic/samples.pt        synthetic images, labels, content and style index
      synthetic/injection.json    injection report, biased-classifier disagreement, timing (each batch's own seconds,
                                  summed over the invocations that made them)
      synthetic/shards/           while the stage runs: one file per batch of pairs, read back by a rerun; removed
                                  once samples.pt is written
      synthetic/injection_grid.png  style | content | result rows
      unet-corpus/, synthetic-corpus/   the same for the diffinject-corpus row (embedded Colored MNIST only)
      classifiers/<method>.pt     one per method of the run (core.methods.REGISTRY: vanilla, lff, jtt, disent, ...)
      classifiers/<method>.json   its test metrics (JTT: its error set's precision against the hidden bias labels)
      classifiers/<method>.ckpt.pt  while it trains: the same, for every model and optimizer of the method
      metrics.json, report.md     every row, the U-Net behind each DiffInject row (``unet_sources``), what each
                                  stage took when it ran (``stage_seconds``)

Rows that say what they use: ``diffinject`` is the label-free method, its U-Net trained on the task's training split
(here, or shipped under ``core/pretrained/<dataset>-<pct>``) or given by the user. ``diffinject-corpus`` uses the U-Net
pretrained on the embedded Colored MNIST's colour-balanced corpus, which took knowledge of the bias to build; it is
reported as its own row, like the oracle, never as the method. Any learner combines with the label-free samples
(``lff+diffinject``, ``jtt+diffinject``, ``disent+diffinject``): each method names the extra data it learns from
(``Method.extra``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from . import diagnostics
from . import methods as registry
from .classifier import (ClassifierConfig, accuracy, group_metrics, load_classifier, load_saved, predict,
                         resolve_arch, save_atomic)
from .data import Dataset, ImageSet, load_dataset, pct_name
from .diffusion import (DiffusionConfig, check_unet, ddim_scheduler, fetch_unet, is_trained, is_unet, load_unet,
                        num_parameters, train_diffusion, unet_folder)
from .injection import (InjectionConfig, Synthetic, check_skip_levels, count_evaluations, inject_batches, plan_pairs,
                        resolve_precision)
from .mining import MiningConfig, difficulty, mine, mining_quality, train_biased

PRETRAINED = Path(__file__).parent / "pretrained"
CORPUS_UNET = PRETRAINED / "cmnist-corpus"  # pretrained on the colour-balanced corpus: uses knowledge of the bias
TRAINED_HERE = "trained in this run on the training split"  # unet_origin of a U-Net the run trained itself
SHIPPED = "shipped"  # RunConfig.unet value: core/pretrained/<dataset>-<pct> (embedded data), else train one


def trained_by(run_dir: Path) -> str:
    """The unet_origin of the U-Net that the run in ``run_dir`` trained, as another run (or table) names it: by its
    runs folder and run, not by this machine's path."""
    return f"trained on the training split by run {run_dir.parent.name}/{run_dir.name}"


# The rows a run can make (core/methods: one class each), and the synthetic sources a method's ``extra`` can name:
# source -> (U-Net folder, synthetic folder) in the run.
METHODS = tuple(registry.REGISTRY)
SYNTHETIC_ROWS = {"diffinject": ("unet", "synthetic"), "diffinject-corpus": ("unet-corpus", "synthetic-corpus")}
# A run's methods when the config names none. On the embedded Colored MNIST the corpus row stays the default while
# the best label-free row is more than 3 points under it (issue 13): 6.7 / 12.2 / 3.4 / 4.4 at 0.5 / 1 / 2 / 5 % since
# the CNN miner lifted both (README, Results; benchmarks/results/debias_table.md; before it, 2.2 and 2.0 at 2 and 5 %).
DEFAULT_METHODS = ("vanilla", "lff", "diffinject", "lff+diffinject", "oracle")  # the label-free rows, alone and on LfF
DEFAULT_METHODS_CMNIST = ("vanilla", "lff", "diffinject-corpus", "oracle")


class StageIncomplete(Exception):
    """A stage stopped at its time budget with its progress saved; rerunning the same command resumes it."""


@dataclass
class RunConfig:
    """Everything that decides a run's results. Defaults are the default preset's."""

    dataset: str = "cmnist"
    data_root: str | None = None  # None: the embedded Colored MNIST
    ratio: float = 1.0  # percent of bias-conflicting training samples: 0.5, 1, 2, 5
    data_seed: int = 0
    image_size: int | None = None  # folder datasets: resize on load (default: native size)
    seed: int = 0  # every stage's randomness
    # the label-free row's U-Net: "shipped" (core/pretrained/<dataset>-<pct> where the project ships one for the
    # embedded data, else trained here), a U-Net folder, or None: train one on the training split
    unet: str | None = SHIPPED
    methods: tuple[str, ...] | None = None  # None: run_methods, by dataset and ratio
    hparams: dict = field(default_factory=dict)  # method name -> its hyperparameters over the registry's defaults
    mining: MiningConfig = field(default_factory=MiningConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self):
        self.methods = tuple(self.methods) if self.methods is not None else None
        for f in fields(self):  # nested sections may arrive as dicts (YAML, JSON)
            value = getattr(self, f.name)
            if isinstance(value, dict) and f.name in _section_types():
                setattr(self, f.name, _section_types()[f.name](**value))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def _section_types():
    return {"mining": MiningConfig, "diffusion": DiffusionConfig, "injection": InjectionConfig,
            "classifier": ClassifierConfig}


PRESETS: dict[str, dict] = {
    # the default: 10-step DDIM, as many synthetic samples as training images (InjectionConfig) from misclassified
    # contents (the measured best, benchmarks/results/experiments.md); the corpus row at embedded cmnist's 0.5 and 1 %.
    # A U-Net trained in the run (a folder dataset, a ratio with none shipped) takes the measured label-free route:
    # half of every batch drawn by the biased model's difficulty (task labels only), as the shipped ones were
    # The U-Net's calls in bf16 where the CPU has bf16 arithmetic ("auto"): 1.8x faster, the same results (3 seeds).
    # Embedded benchmarks whose measurements chose other settings: EMBEDDED_DEFAULTS
    "default": {"diffusion": {"hard_share": 0.5}, "injection": {"precision": "auto"}},
    # for tests and smoke runs: a tiny U-Net trained on the training split for a few steps, a few epochs; a minute
    "quick": {
        "unet": None,
        "methods": ["vanilla", "lff", "diffinject", "oracle"],
        "mining": {"k": 5, "classifier": {"epochs": 4}},
        "diffusion": {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "DownBlock2D"],
                      "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "steps": 30,
                      "batch_size": 32, "checkpoint_every": 10},
        "injection": {"steps": 5, "num_samples": 24, "batch_size": 16},
        "classifier": {"epochs": 4},
    },
    # the paper's reference settings (for a GPU): 1000-step DDIM, U-Net trained on the dataset itself
    "paper": {
        "unet": None,
        "mining": {"k": 10, "misclassified_only": False, "classifier": {"epochs": 50}},
        "diffusion": {"steps": 50000, "ema_decay": 0.9999},
        "injection": {"steps": 1000, "t_edit": 500, "gamma": 0.5, "t_boost": 200, "dt_lambda": 0.9985,
                      "synthetic_ratio": 0.1},
        "classifier": {"epochs": 50},
    },
}


def merge(base: dict, override: dict) -> dict:
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


# The default preset's settings for one embedded benchmark, where the measurement chose otherwise
# (benchmarks/results/experiments.md, 2026-12-04, eighth session; 3 seeds, 4 ratios). h widened to the coarsest up
# block's skips (skip_levels 1) made Corrupted MNIST's classifiers 1-6 points better at every ratio; on Colored MNIST
# the coarse skips carry the colour and the classifiers lost 2.5-3.6 points at 0.5-1 %, and a background-colour
# folder benchmark came out level, so every other dataset keeps h at the middle block (the paper's h-space).
# The miner there is the small CNN with K = 5 (2026-12-05, eleventh session): the MLP learns few of the ten textures,
# so its mistakes were mostly illegible bias-aligned digits (mining precision 19 / 34 / 54 / 66 % at 0.5 / 1 / 2 / 5 %);
# the CNN's are mostly the conflicts (40 / 71 / 85 / 100 %), and that alone gave the best label-free row +5.0 / +2.9 /
# +4.1 / +0.3. LfF's biased model is the same CNN there, alone and under DiffInject: the strongest peer (LfF 36.0 /
# 44.0 / 57.6 / 63.7 against 33.3 / 38.7 / 48.1 / 56.5 with its MLP) and a better combination (+2.0 to +4.9).
# On Colored MNIST the miner is the same CNN keeping only its confident mistakes (min_loss 4 nats; fifteenth session):
# it fails every conflict with a near-certain wrong answer, and the threshold drops most of its hesitant mistakes on
# aligned digits. With the 0.5 / 1 / 2 % U-Nets trained by its difficulty it lifted DiffInject by 5.0 / 2.8 / 7.7 and
# the injection report at 0.5 % from 37.4 to 60.7 %; at 5 % (that split's GPU-trained U-Net kept) it is level within
# a standard deviation (72.8 against 73.6). LfF keeps its MLP there: the CNN was not measured as LfF's model on it.
# On Corrupted MNIST the CNN's confident mistakes too (min_loss 4), each drawn in proportion to its CE capped at 20
# nats (sixteenth session): the injection report at 0.5 % rises from 44.6 to 55.0 % (74.1 / 67.0 / 54.8 % at 1 / 2 /
# 5 %), and the best label-free row moves -2.6 / +0.1 / +1.5 / +0.4, each inside the seeds' spread.
EMBEDDED_DEFAULTS: dict[str, dict] = {
    "cmnist": {"mining": {"k": 5, "min_loss": 4.0, "classifier": {"arch": "cnn"}}},
    "corrupted_mnist": {"injection": {"skip_levels": 1},
                        "mining": {"k": 5, "min_loss": 4.0, "loss_weight_cap": 20.0, "classifier": {"arch": "cnn"}},
                        "hparams": {"lff": {"biased_arch": "cnn"}, "lff+diffinject": {"biased_arch": "cnn"}}},
}


def make_config(preset: str = "default", overrides: dict | None = None) -> RunConfig:
    """Preset (the default one with its embedded benchmark's ``EMBEDDED_DEFAULTS``), then ``overrides`` (from YAML
    and the command line), nested dicts merged key by key."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}")
    cfg = merge(RunConfig().to_dict(), PRESETS[preset])
    asked = merge(cfg, overrides or {})
    if preset == "default" and asked["data_root"] is None:
        cfg = merge(cfg, EMBEDDED_DEFAULTS.get(asked["dataset"], {}))
    cfg = merge(cfg, overrides or {})
    known = RunConfig().to_dict()
    _check_keys(cfg, known, "")
    return RunConfig(**cfg)


def _check_keys(cfg: dict, known: dict, prefix: str) -> None:
    for k, v in cfg.items():
        if k not in known:
            raise ValueError(f"unknown config key '{prefix}{k}'")
        if isinstance(v, dict) and isinstance(known[k], dict) and k != "hparams":  # hparams: checked by validate
            _check_keys(v, known[k], f"{prefix}{k}.")


# ---------------------------------------------------------------------------------------------------------


def _save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# Settings added after run folders existed whose default is not what such a folder was made with: a folder's
# config.json without them is read at these values (any other missing setting reads at its default).
BEFORE_SETTING_EXISTED = {"mining": {"misclassified_only": False, "min_loss": 0.0}}
# The same for a method's hyperparameters in a finished classifier's record (classifiers/<method>.json).
PARAMS_BEFORE_THEY_EXISTED = {"cap_extra_weight": False}


def saved_config(run_dir: str | Path) -> RunConfig:
    """The config a run folder was made with (its ``config.json``): a setting added to the code since counts at the
    value it had then (``BEFORE_SETTING_EXISTED``, else its default)."""
    saved = json.loads((Path(run_dir) / "config.json").read_text())
    return RunConfig(**merge(merge(RunConfig().to_dict(), BEFORE_SETTING_EXISTED), saved))


def recorded_params(record: dict) -> dict:
    """The hyperparameters a finished classifier's record (``classifiers/<method>.json``) says it was trained with,
    those added since it was made at the value it had then."""
    return {**PARAMS_BEFORE_THEY_EXISTED, **record.get("params", {})}


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _diff_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + k)
    return keys


def validate(cfg: RunConfig, ds: Dataset) -> None:
    """Input checks that need the data: K against class sizes, known methods, gamma."""
    cfg.injection.validate()
    smallest = int(torch.bincount(ds.train.labels).min())
    if not 1 <= cfg.mining.k <= smallest:
        raise ValueError(f"K={cfg.mining.k} is out of range: it must be between 1 and {smallest} (the smallest class)")
    methods = run_methods(cfg)
    if not isinstance(cfg.hparams, dict):
        raise ValueError(f"hparams must map method names to their hyperparameters, got {cfg.hparams!r}")
    for name in dict.fromkeys([*methods, *cfg.hparams]):  # unknown names and hyperparameters: a one-line error
        registry.get(name, cfg.hparams.get(name))
    if "diffinject-corpus" in sources_of(methods) and not _embedded_cmnist(cfg):
        raise ValueError("diffinject-corpus needs the embedded cmnist: its U-Net was pretrained on that benchmark's "
                         "colour-balanced corpus")


def _embedded_cmnist(cfg: RunConfig) -> bool:
    return cfg.dataset == "cmnist" and cfg.data_root is None


def synthetic_source(method: str) -> str | None:
    """The synthetic source (a ``SYNTHETIC_ROWS`` key) a registered method learns from, if any."""
    extra = registry.REGISTRY[method].extra if method in registry.REGISTRY else None
    return extra if extra in SYNTHETIC_ROWS else None


def sources_of(methods) -> list[str]:
    """The synthetic sources the ``methods`` learn from, in the order first named."""
    return list(dict.fromkeys(s for s in map(synthetic_source, methods) if s is not None))


def run_methods(cfg: RunConfig) -> tuple[str, ...]:
    """The config's methods, or the default ones for its dataset (the corpus row's on the embedded Colored MNIST)."""
    if cfg.methods is not None:
        return cfg.methods
    return DEFAULT_METHODS_CMNIST if _embedded_cmnist(cfg) else DEFAULT_METHODS


def shipped_unet(cfg: RunConfig) -> Path | None:
    """The label-free U-Net the project ships for the config's embedded dataset and ratio, if any."""
    path = PRETRAINED / f"{cfg.dataset}-{pct_name(cfg.ratio)}"
    return path if cfg.data_root is None and is_trained(path) else None


def bias_knowledge_phrase(knows: bool | None) -> str:
    """How reports and tables say whether a U-Net was built with knowledge of the bias."""
    return {True: "built with knowledge of the bias", False: "no knowledge of the bias",
            None: "not recorded whether it used knowledge of the bias"}[knows]


def weights_digest(folder: Path) -> str | None:
    """The first 16 hex digits of the SHA-256 of a U-Net folder's weights file (None where it has none): a path
    names whichever model is there now, so a table that outlives a replaced model names it by this."""
    files = sorted(Path(folder).glob("diffusion_pytorch_model*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def describe_unet(folder: Path, origin: str) -> dict:
    """Where a row's U-Net came from, what it learnt from (its ``train.json``) and which weights it is
    (:func:`weights_digest`): the tables' ``unet_sources``."""
    train = json.loads((Path(folder) / "train.json").read_text()) if (Path(folder) / "train.json").exists() else {}
    data = train.get("data", {})
    return {"origin": origin, "data": data, "steps": train.get("steps"),
            "bias_knowledge": data.get("bias_knowledge"),  # None: not recorded (a U-Net from elsewhere)
            "weights_sha256": weights_digest(folder)}


def generate_in_process(unet_dir: Path, images: torch.Tensor, labels: torch.Tensor, pairs, cfg: InjectionConfig,
                        seed: int, device: str = "cpu", progress: bool = True,
                        shards: Path | None = None) -> tuple[Synthetic, int, float]:
    """The generation stage in this process: the synthetic samples, the U-Net evaluations (images) and the seconds
    they took.

    With ``shards`` (a folder) each batch of ``cfg.batch_size`` pairs is saved there as it is made, with its pairs,
    evaluations and seconds; a rerun reads back every batch whose shard holds the pairs planned for it and
    generates the rest, to the pixels, evaluations and (summed) seconds of an uninterrupted run (see
    :func:`~core.injection.inject_batches` for why its contents are still inverted).
    """
    unet = load_unet(unet_dir, device)
    saved = {}
    if shards is not None:
        shards.mkdir(parents=True, exist_ok=True)
        saved = _saved_shards(shards, pairs, cfg.batch_size)
    made = dict(saved)
    with count_evaluations(unet) as evals:
        mark, t0 = 0, time.time()
        for rows, syn in inject_batches(unet, ddim_scheduler(unet_dir), images, labels, pairs, cfg, seed, device,
                                        progress, skip=set(saved)):
            spent, mark = evals["images"] - mark, evals["images"]
            if syn is not None:  # a saved batch's inversions were counted when it was made
                made[rows.start] = {**vars(syn), "evaluations": spent, "seconds": time.time() - t0}
                if shards is not None:
                    save_atomic(_shard_path(shards, rows.start), made[rows.start])
            t0 = time.time()
    parts = [made[start] for start in sorted(made)]
    syn = Synthetic.cat([Synthetic(**{f.name: p[f.name] for f in fields(Synthetic)}) for p in parts])
    return syn, sum(p["evaluations"] for p in parts), sum(p["seconds"] for p in parts)


def _shard_path(shards: Path, start: int) -> Path:
    return shards / f"{start:07d}.pt"


def _saved_shards(shards: Path, pairs, batch_size: int) -> dict[int, dict]:
    """The shards in ``shards`` that hold the pairs planned for their batch, by the batch's first row; any other
    (from other pairs, or unreadable) is ignored, so its batch is generated again."""
    saved = {}
    for start in range(0, len(pairs.content), batch_size):
        try:
            shard = load_saved(_shard_path(shards, start))
        except (OSError, RuntimeError, EOFError):  # absent, or not a complete torch file
            continue
        rows = slice(start, start + batch_size)
        if np.array_equal(shard["content"], pairs.content[rows]) and np.array_equal(shard["style"], pairs.style[rows]):
            saved[start] = shard
    return saved


@dataclass
class Synthesized:
    """What :func:`synthesize` made: the samples, the U-Net evaluations and the seconds they took."""

    samples: Synthetic
    evaluations: int
    seconds: float


def synthesize(unet_dir: Path, train: ImageSet, pool: np.ndarray, cfg: InjectionConfig, seed: int, generate=None,
               device: str = "cpu", progress: bool = True, shards: Path | None = None, weights=None) -> Synthesized:
    """Stage 3 after mining, for the pipeline and every Tune trial alike: pair ``cfg.count`` contents from ``pool``
    (drawn by their ``weights``, see :func:`~core.injection.plan_pairs`) with styles and generate with ``generate``
    (default :func:`generate_in_process`).

    A generator returns ``(samples, evaluations)``, or ``(samples, evaluations, seconds)`` when it knows better
    than the wall clock how long its samples took (resumed from shards); ``shards`` reaches it only if it takes a
    ``shards`` argument (the Ray fan-out does not).
    """
    generate = generate or generate_in_process
    pairs = plan_pairs(train.labels, pool, cfg.count(len(train)), seed, weights=weights)
    kw = {"shards": shards} if shards is not None and _takes(generate, "shards") else {}
    t0 = time.time()
    syn, evaluations, *seconds = generate(unet_dir, train.images, train.labels, pairs, cfg, seed, device, progress,
                                          **kw)
    return Synthesized(syn, evaluations, seconds[0] if seconds else time.time() - t0)


def fit_method(method: registry.Method, train: ImageSet, extra, valid: ImageSet, num_classes: int,
               cfg: ClassifierConfig, seed: int, device: str = "cpu", progress: bool = True,
               on_epoch=None, checkpoint: Path | None = None) -> registry.Trained:
    """Stage 4, for the pipeline and every Tune trial alike: ``method`` trained on the training split plus its
    ``extra`` ``(images, labels)``, with every bias label blanked first, so no method can read one; the split's
    ``extras["from_extra"]`` marks the samples that came from ``extra`` (provenance, not bias). ``checkpoint``
    (epoch checkpoints, see :meth:`Method.fit <core.methods.base.Method.fit>`) reaches methods that take it."""
    images, labels = train.images, train.labels
    from_extra = torch.zeros(len(labels), dtype=torch.bool)  # provenance, not bias: which samples are the extra data
    if extra is not None:
        images, labels = torch.cat([images, extra[0]]), torch.cat([labels, extra[1]])
        from_extra = torch.cat([from_extra, torch.ones(len(extra[1]), dtype=torch.bool)])
    kw = {"checkpoint": checkpoint} if checkpoint is not None and _takes(method.fit, "checkpoint") else {}
    return method.fit(ImageSet(images, labels, torch.full_like(labels, -1), {"from_extra": from_extra}),
                      valid.blind(), num_classes, cfg, seed, device, progress, on_epoch, **kw)


def _takes(fn, name: str) -> bool:
    """Whether ``fn`` has a parameter ``name`` (optional protocol arguments go only to those that take them)."""
    return name in inspect.signature(fn).parameters


class Run:
    """A run folder and its stages. ``Run(folder, cfg).all()`` does everything; each stage resumes.

    ``generate`` replaces the in-process generation stage (same signature as ``generate_in_process``): the Ray
    fan-out over injection actors plugs in here, so this module never imports Ray.
    """

    def __init__(self, folder: str | Path, cfg: RunConfig, device: str = "cpu", progress: bool = True,
                 dataset: Dataset | None = None, generate=None, max_diffusion_seconds: float | None = None):
        self.dir, self.cfg, self.device, self.progress = Path(folder), cfg, device, progress
        self.generate = generate or generate_in_process
        self.max_diffusion_seconds = max_diffusion_seconds  # a time budget for training the U-Net here
        self.ds = dataset or load_dataset(cfg.dataset, cfg.ratio, cfg.data_root, cfg.data_seed, cfg.image_size)
        validate(cfg, self.ds)
        self._check_unets()
        self.timings: dict[str, float] = {}
        self._claim_folder()

    def _claim_folder(self) -> None:
        path = self.dir / "config.json"
        if path.exists():
            # a setting added to the code after the folder was made counts at the value it was made with, so new
            # options never lock users out of their finished runs, nor resume them under other settings
            diff = _diff_keys(saved_config(self.dir).to_dict(), self.cfg.to_dict())
            if not self.trains_unet():  # then the diffusion settings decide nothing in this folder
                diff = [k for k in diff if not k.startswith("diffusion.")]
            # other methods or hyperparameters reuse the shared stages: each classifier is kept under its method's
            # name with the hyperparameters it was trained with, and refused under others (Run.method)
            learners = [k for k in diff if k == "methods" or k.startswith("hparams")]
            diff = [k for k in diff if k not in learners]
            if diff:
                raise ValueError(f"run folder {self.dir} was made by another config (differs in {', '.join(diff)}); "
                                 "use another run folder")
            if learners:
                _save_json(path, self.cfg.to_dict())  # the folder's config is the last one that ran in it
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        _save_json(path, self.cfg.to_dict())

    def _check_unets(self) -> None:
        """A synthetic row's given U-Net that cannot work (:meth:`unet_source`), or a ``skip_levels`` it cannot take
        (read from its config, or the settings it will be trained with), is refused now, not after mining and U-Net
        training."""
        for method in sources_of(run_methods(self.cfg)):
            source = self.row_unet_source(method)
            folder = None if source is None else unet_folder(source)
            if source is not None and folder is None:
                continue  # a hub id: checked when the injection runs
            up = (self.cfg.diffusion.up_block_types if folder is None
                  else json.loads((folder / "config.json").read_text())["up_block_types"])
            check_skip_levels(self.cfg.injection.skip_levels, len(up))

    def trains_unet(self) -> bool:
        """Whether this run trains the label-free row's U-Net itself (no ``unet`` given, none shipped)."""
        return "diffinject" in sources_of(run_methods(self.cfg)) and self.unet_source() is None

    def _timed(self, name, fn):
        t0 = time.time()
        out = fn()
        self.timings[name] = round(time.time() - t0, 1)
        return out

    # -- stage 1 ---------------------------------------------------------------------------------------------
    def biased(self):
        path = self.dir / "biased" / "model.pt"
        tr = self.ds.train
        if path.exists():
            return load_classifier(path, self.cfg.mining.classifier, self.ds.image_shape, self.ds.num_classes)
        path.parent.mkdir(exist_ok=True)
        checkpoint = path.with_suffix(".ckpt.pt")  # epoch checkpoints: a rerun resumes after the last epoch
        model = self._timed("biased", lambda: train_biased(tr.images, tr.labels, self.ds.num_classes, self.cfg.mining,
                                                           self.cfg.seed, self.device, self.progress, checkpoint))
        save_atomic(path, model.state_dict())
        checkpoint.unlink(missing_ok=True)
        return model.cpu()

    def mined(self) -> np.ndarray:
        """The mined contents' training-set indices (``biased/mining.json``, mined now if it is not there)."""
        return self.mined_and_weights()[0]

    def mined_and_weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The mined indices and how often each is drawn as a content (``mining.loss_weight_cap``; None: equally
        often), from one read of ``biased/mining.json``."""
        path = self.dir / "biased" / "mining.json"
        if path.exists():
            saved = json.loads(path.read_text())
            weights = saved.get("weights")  # absent in folders mined before the setting existed: equally often
            return np.array(saved["indices"]), None if weights is None else np.array(weights)
        tr = self.ds.train
        result = mine(self.biased(), tr.images, tr.labels, self.cfg.mining.k,
                      **self.cfg.mining.filters)
        quality = mining_quality(result.indices, tr.labels, tr.bias)  # evaluation only
        rows = [tr.images[result.indices[tr.labels[result.indices] == c]] for c in range(self.ds.num_classes)]
        diagnostics.save_grid(rows, self.dir / "biased" / "mined.png")
        # rounded as saved, so this run and a rerun that reads them back draw the same pairs
        weights = None if result.weights is None else [round(float(w), 4) for w in result.weights]
        _save_json(path, {"indices": result.indices.tolist(), "weights": weights, "quality": quality,
                          "seconds": self.timings.get("biased")})  # None where the biased model was trained earlier
        return result.indices, None if weights is None else np.array(weights)

    # -- stage 2 ---------------------------------------------------------------------------------------------
    def unet_dir(self, method: str = "diffinject") -> Path:
        """The U-Net of a synthetic row: copied from its source, or trained here on the training images only.

        ``diffinject``: ``cfg.unet`` (shipped for this dataset and ratio, a folder, or trained here, resuming on a
        rerun and stopping at ``max_diffusion_seconds`` with :class:`StageIncomplete`); ``diffinject-corpus``: the
        corpus U-Net.
        """
        out = self.dir / SYNTHETIC_ROWS[method][0]
        source = self.row_unet_source(method)
        if source is not None:
            if not is_unet(out):
                fetch_unet(source, out, self.ds.image_shape[0])
            return out
        if is_trained(out) and json.loads((out / "train.json").read_text())["steps"] >= self.cfg.diffusion.steps:
            return out
        weights = None
        about = {"dataset": self.ds.name, "ratio": pct_name(self.cfg.ratio), "split": "train",
                 "hard_share": self.cfg.diffusion.hard_share, "bias_knowledge": False}
        if self.cfg.diffusion.hard_share > 0:  # the biased model's difficulty: task labels only
            weights = difficulty(self.biased(), self.ds.train.images, self.ds.train.labels, self.device)
            # which biased model drew the hard half: it decides what the U-Net oversamples (experiments.md, 12th)
            about["hard_by"] = resolve_arch(self.cfg.mining.classifier.arch, self.ds.image_shape[1])
        result = self._timed("diffusion", lambda: train_diffusion(
            self.ds.train.images, self.cfg.diffusion, out, self.cfg.seed, self.device, self.progress,
            max_seconds=self.max_diffusion_seconds, sample_weights=weights, about=about))
        if result.steps < self.cfg.diffusion.steps:
            raise StageIncomplete(f"the U-Net stopped at its time budget after {result.steps} of "
                                  f"{self.cfg.diffusion.steps} steps, saved in {out}; rerun the same command to resume")
        return out

    def unet_source(self) -> Path | str | None:
        """The label-free row's U-Net to copy (a folder in any diffusers layout, or a hub id), or None to train one
        here; a U-Net that cannot work on this dataset is refused with a one-line error before any stage runs."""
        if self.cfg.unet is None:
            return None
        if self.cfg.unet == SHIPPED:
            return shipped_unet(self.cfg)
        check_unet(self.cfg.unet, self.ds.image_shape[0])
        return Path(self.cfg.unet) if is_unet(self.cfg.unet) else self.cfg.unet

    def row_unet_source(self, method: str) -> Path | str | None:
        """The U-Net a synthetic row copies (:meth:`unet_source`; the corpus U-Net for ``diffinject-corpus``), or
        None where the run trains it."""
        return CORPUS_UNET if method == "diffinject-corpus" else self.unet_source()

    def unet_origin(self, method: str) -> str:
        if method == "diffinject-corpus":
            return f"{CORPUS_UNET.relative_to(PRETRAINED.parent.parent)} (pretrained on the colour-balanced corpus)"
        source = self.unet_source()
        if source is None:
            return TRAINED_HERE
        if isinstance(source, Path) and source.resolve().parent == PRETRAINED.resolve():
            # shipped, whether found for this ratio or named with --unet (e.g. the 1 % one at 5 %): one spelling
            return f"{source.resolve().relative_to(PRETRAINED.resolve().parent.parent)} (shipped)"
        if isinstance(source, Path) and source.name == "unet" and (source.parent / "config.json").exists():
            return trained_by(source.parent)  # another run's U-Net stage (debias_table's --unet per-ratio)
        return str(source)

    # -- stage 3 ---------------------------------------------------------------------------------------------
    def synthetic(self, method: str = "diffinject") -> Synthetic:
        """The synthetic samples of a synthetic row (``diffinject`` or ``diffinject-corpus``): the same pairs for
        both, each from its own U-Net."""
        folder = self.dir / SYNTHETIC_ROWS[method][1]
        path = folder / "samples.pt"
        if path.exists():
            return Synthetic.load(path)
        pool, weights = self.mined_and_weights()
        unet_dir = self.unet_dir(method)
        cfg, tr = self.cfg.injection, self.ds.train
        # each batch saved as it is made (synthetic/shards/), so an interrupted stage resumes where it stopped
        made = self._timed(f"inject {method}", lambda: synthesize(
            unet_dir, tr, pool, cfg, self.cfg.seed, self.generate, self.device, self.progress, shards=folder / "shards",
            weights=weights))
        syn, evaluations, seconds = made.samples, made.evaluations, made.seconds
        generated = len(syn.labels)
        folder.mkdir(exist_ok=True)
        diagnostics.injection_grid(tr.images, syn, folder / "injection_grid.png")
        info = {"samples": generated, "seconds": round(seconds, 1),
                "images_per_second": round(generated / max(seconds, 1e-9), 2),
                "unet_parameters": num_parameters(load_unet(unet_dir)),
                "unet_evaluations_per_sample": round(evaluations / max(1, generated), 1),
                "precision": resolve_precision(cfg.precision, self.device),  # what "auto" became here
                "compile": cfg.compile,
                "biased_model_wrong": diagnostics.biased_disagreement(self.biased(), syn.images, syn.labels)}
        if self.readers is not None:
            info["report"] = diagnostics.injection_report(syn, tr.images, tr.labels, self.readers, tr.bias)
        _save_json(folder / "injection.json", info)
        syn.save(path)  # last: its existence marks the stage done
        shutil.rmtree(folder / "shards", ignore_errors=True)
        return syn

    @cached_property
    def readers(self):
        """The benchmark's evaluation-only readers (None on a folder dataset), trained once per invocation."""
        return diagnostics.readers_for(self.ds, seed=self.cfg.seed)

    # -- stage 4 and baselines ---------------------------------------------------------------------------------
    def method(self, name: str) -> dict:
        """Train (or read back) one registered method on the training split plus its extra data; its test metrics."""
        folder = self.dir / "classifiers"
        metrics_path = folder / f"{name}.json"
        method = registry.get(name, self.cfg.hparams.get(name))
        if metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            metrics.pop("seconds", None)  # what training took: stage_seconds reports it, the results do not
            was = recorded_params(metrics)
            changed = sorted(k for k, v in asdict(method.params).items() if k in was and was[k] != v)
            if changed:  # a default changed since: never report the old model under the new settings
                raise ValueError(f"{name} in {folder} was trained with other hyperparameters ({', '.join(changed)}); "
                                 "use another run folder, or set them as it was trained in hparams")
            return metrics
        folder.mkdir(exist_ok=True)
        ds = self.ds
        checkpoint = folder / f"{name}.ckpt.pt"  # epoch checkpoints: a rerun resumes after the last epoch
        extra = self.extra_data(method.extra)
        t0 = time.time()
        trained = fit_method(method, ds.train, extra, ds.valid, ds.num_classes,
                             self.cfg.classifier, self.cfg.seed, self.device, self.progress, checkpoint=checkpoint)
        self.timings[name] = round(time.time() - t0, 1)
        model = trained.model
        metrics = group_metrics(predict(model, ds.test.images, device=self.device).argmax(1), ds.test.labels,
                                ds.test.bias)
        metrics["valid"] = round(100.0 * accuracy(model, ds.valid.images, ds.valid.labels, self.device), 2)
        metrics["params"] = asdict(method.params)  # the hyperparameters it ran with (registry defaults + hparams)
        if "error_set" in trained.info:  # JTT's error set is a mining signal: scored like mining (evaluation only)
            errors = np.array([i for i in trained.info["error_set"] if i < len(ds.train)], dtype=int)
            metrics["error_set"] = mining_quality(errors, ds.train.labels, ds.train.bias)
        save_atomic(folder / f"{name}.pt", model.state_dict())
        _save_json(metrics_path, {**metrics, "seconds": self.timings[name]})  # its cost, beside (not in) its results
        checkpoint.unlink(missing_ok=True)
        return metrics

    def extra_data(self, extra: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The data a method learns from beside the training split: a synthetic source's samples, or the oracle's
        real digits redrawn with another class's bias value (as many as the synthetic rows get)."""
        if extra is None:
            return None
        if extra == "oracle":
            return registry.oracle_samples(self.ds.name, self.ds.train, self.cfg.injection.count(len(self.ds.train)),
                                           self.cfg.seed)
        syn = self.synthetic(extra)
        return syn.images, syn.labels

    def methods(self) -> list[str]:
        methods = list(run_methods(self.cfg))
        if "oracle" in methods and "grey" not in self.ds.train.extras:
            methods.remove("oracle")  # the ceiling exists only where the bias can be undone by hand
        return methods

    def describe_source(self, method: str) -> dict:
        """A synthetic row's ``unet_sources`` entry: its U-Net (:func:`describe_unet`)."""
        return describe_unet(self.dir / SYNTHETIC_ROWS[method][0], self.unet_origin(method))

    def stage_seconds(self, synthetic_rows) -> dict[str, float | None]:
        """What each of this folder's stages took when it ran, read from its artifact (so a finished run reports
        its cost, not the seconds it took to read it back); None for an artifact from before it recorded that."""
        read = lambda path: json.loads(path.read_text()).get("seconds") if path.exists() else None  # noqa: E731
        out = {"biased": read(self.dir / "biased" / "mining.json")}
        if self.trains_unet():  # a copied U-Net cost this run nothing
            out["diffusion"] = read(self.dir / SYNTHETIC_ROWS["diffinject"][0] / "train.json")
        out |= {f"synthetic:{m}": read(self.dir / SYNTHETIC_ROWS[m][1] / "injection.json") for m in synthetic_rows}
        return out | {m: read(self.dir / "classifiers" / f"{m}.json") for m in self.methods()}

    # -- everything ------------------------------------------------------------------------------------------
    def all(self) -> dict:
        """Run (or resume) every stage; write metrics.json and report.md; return the metrics."""
        t0 = time.time()
        self.mined()
        synthetic_rows = sources_of(self.methods())
        for m in synthetic_rows:
            self.synthetic(m)
        results = {m: self.method(m) for m in self.methods()}
        metrics = {
            "dataset": {"name": self.ds.name, "ratio": self.cfg.ratio, "train": len(self.ds.train),
                        "valid": len(self.ds.valid), "test": len(self.ds.test), "num_classes": self.ds.num_classes,
                        "image_shape": list(self.ds.image_shape)},
            "seed": self.cfg.seed,
            "mining": json.loads((self.dir / "biased" / "mining.json").read_text())["quality"],
            "injection": {m: json.loads((self.dir / SYNTHETIC_ROWS[m][1] / "injection.json").read_text())
                          for m in synthetic_rows},
            "unet_sources": {m: self.describe_source(m) for m in synthetic_rows},
            "methods": results,
            "seconds_this_invocation": round(time.time() - t0, 1),
            "stage_seconds_this_invocation": self.timings,
            "stage_seconds": self.stage_seconds(synthetic_rows),
        }
        _save_json(self.dir / "metrics.json", metrics)
        (self.dir / "report.md").write_text(render_report(metrics, self.cfg))
        return metrics


METRIC_COLUMNS = ("unbiased", "aligned", "conflicting", "worst_group", "valid")
NAMES = {name: method.label for name, method in registry.REGISTRY.items()}  # the tables' row labels


def render_report(metrics: dict, cfg: RunConfig) -> str:
    ds = metrics["dataset"]
    lines = [f"# DiffInject run: {ds['name']} at {ds['ratio']:g} % conflicts, seed {metrics['seed']}", "",
             "Test accuracy (%) on the unbiased test split; the checkpoint of each method was chosen on the validation split.", "",
             "| method | " + " | ".join(METRIC_COLUMNS) + " |", "|---" * (len(METRIC_COLUMNS) + 1) + "|"]
    for name, m in metrics["methods"].items():
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(f"{m[c]:.2f}" for c in METRIC_COLUMNS) + " |")
    for name, src in metrics.get("unet_sources", {}).items():
        lines.append(f"\n{NAMES.get(name, name)}: U-Net {src['origin']}; {bias_knowledge_phrase(src['bias_knowledge'])}.")
    q = metrics["mining"]
    lines += ["", f"## Mining (K = {cfg.mining.k} per class)", "",
              f"{q['mined']} samples mined; precision {q['precision']:.1f} %, recall {q['recall']:.1f} % "
              f"of the {q['true_conflicts']} true bias-conflicting training samples (bias labels read for this line only).",
              "", "![mined samples](biased/mined.png)"]
    for name, inj in metrics.get("injection", {}).items():
        lines += ["", f"## Injection, {NAMES.get(name, name)} (gamma {cfg.injection.gamma}, t_edit {cfg.injection.t_edit}, "
                      f"{cfg.injection.steps} DDIM steps, labels from the {cfg.injection.label_from})", "",
                  f"{inj['samples']} synthetic samples in {inj['seconds']} s ({inj['images_per_second']} images/s, "
                  f"{inj['unet_evaluations_per_sample']} U-Net evaluations per sample); "
                  f"the biased classifier gets {inj['biased_model_wrong']:.1f} % of them wrong (label-free conflict signal)."]
        rep = inj.get("report")
        if rep:
            keys = diagnostics.REPORT_KEYS
            lines += ["", f"Injection report (\"colour\" is the bias attribute, {rep['bias_attribute']}; class reader "
                          f"accuracy on the test split {rep['shape_reader_test_accuracy']:.1f} %, bias reader "
                          f"{rep['colour_reader_test_accuracy']:.1f} %):", "",
                      "| " + " | ".join(keys) + " |", "|---" * len(keys) + "|",
                      "| " + " | ".join(f"{rep[k]:.1f} %" for k in keys) + " |"]
            if "by_content" in rep:  # bias labels read for this line only
                lines += ["", "By content (bias labels read for this line only): " + "; ".join(
                    f"{part['share']:.1f} % of the samples come from {name} contents, and "
                    f"{part['content_digit_other_colour']:.1f} % of those show their class with another "
                    f"{rep['bias_attribute']}" for name, part in rep["by_content"].items()
                    if "content_digit_other_colour" in part) + "."]
        lines += ["", f"![style | content | result]({SYNTHETIC_ROWS[name][1]}/injection_grid.png)"]
    return "\n".join(lines) + "\n"
