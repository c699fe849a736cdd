"""A run folder (:class:`Run`): the whole method, mine -> diffusion -> inject -> debias, with the peers
(core/methods) beside it, and where each row's U-Net came from.

Each stage writes its files whole (core.artifacts) and ends by sealing them in its manifest; a stage whose
manifest is there and matches its files is skipped, so a rerun resumes where the last one stopped, and a file that
no longer matches its manifest is named and its stage redone from the last good checkpoint. A run folder belongs
to one config: rerunning it with another config is an error, never an overwrite.

    run/
      .lock                       held by the one process writing the folder, with its PID (core.lock)
      config.json                 the full RunConfig
      manifests/<stage>.json      each finished stage's files with their size and SHA-256, written last: biased,
                                  mining, unet, synthetic, classifier-<method> (and unet-corpus, synthetic-corpus)
      biased/model.pt             GCE-trained biased classifier
      biased/train.json           the epochs it trained and its training error (%) at each check (core.mining)
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
                                  stage took when it ran (``stage_seconds``), the stages this invocation redone
                                  because a file no longer matched its manifest (``repairs``)

Rows that say what they use: ``diffinject`` is the label-free method, its U-Net trained on the task's training split
(here, or shipped under ``core/pretrained/<dataset>-<pct>``) or given by the user. ``diffinject-corpus`` uses the U-Net
pretrained on the embedded Colored MNIST's colour-balanced corpus, which took knowledge of the bias to build; it is
reported as its own row, like the oracle, never as the method. Any learner combines with the label-free samples
(``lff+diffinject``, ``jtt+diffinject``, ``disent+diffinject``): each method names the extra data it learns from
(``Method.extra``).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from . import diagnostics
from . import methods as registry
from .artifacts import CorruptFile, check, folder_files, read_json, save_json, save_torch, seal, unseal
from .classifier import (accuracy, aligned_attributes, group_metrics, load_classifier, own_data_metrics, predict,
                         resolve_arch)
from .config import (SHIPPED, SYNTHETIC_ROWS, RunConfig, check_keys, check_settings, check_types, merge, run_methods,
                     dataset_for, sources_of, validate)
from .data import FILE_BUILT, Dataset, pct_name
from .diffusion import (check_unet, fetch_unet, is_trained, is_unet, load_unet, num_parameters, read_unet_config,
                        train_diffusion, unet_folder)
from .hspace import check_skip_levels, resolve_precision
from .lock import lock_folder
from .injection import Synthetic
from .mining import difficulty, mine, mining_quality, train_biased
from .report import write_report
from .stages import fit_method, generate_in_process, synthesize

PRETRAINED = Path(__file__).parent / "pretrained"
CORPUS_UNET = PRETRAINED / "cmnist-corpus"  # pretrained on the colour-balanced corpus: uses knowledge of the bias
TRAINED_HERE = "trained in this run on the training split"  # unet_origin of a U-Net the run trained itself


def trained_by(run_dir: Path) -> str:
    """The unet_origin of the U-Net that the run in ``run_dir`` trained, as another run (or table) names it: by its
    runs folder and run, not by this machine's path."""
    return f"trained on the training split by run {run_dir.parent.name}/{run_dir.name}"


class StageIncomplete(Exception):
    """A stage stopped at its time budget with its progress saved; rerunning the same command resumes it."""


# Settings added after run folders existed whose default is not what such a folder was made with: a folder's
# config.json without them is read at these values (any other missing setting reads at its default).
BEFORE_SETTING_EXISTED = {"mining": {"misclassified_only": False, "min_loss": 0.0}}
# The same for a method's hyperparameters in a finished classifier's record (classifiers/<method>.json).
PARAMS_BEFORE_THEY_EXISTED = {"cap_extra_weight": False, "biased_learns_extra": True}


def saved_config(run_dir: str | Path) -> RunConfig:
    """The config a run folder was made with (its ``config.json``): a setting added to the code since counts at the
    value it had then (``BEFORE_SETTING_EXISTED``, else its default)."""
    path = Path(run_dir) / "config.json"
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise CorruptFile(path, "not a run's settings (a JSON mapping)")
    known = RunConfig().to_dict()
    try:
        check_keys(saved, known)
    except ValueError as e:  # a setting retired since the folder was made
        raise ValueError(f"{run_dir} was made by another version of diffinject ({e}): give this run another "
                         "--out") from None
    check_types(saved, str(path))
    return RunConfig(**merge(merge(known, BEFORE_SETTING_EXISTED), saved))


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


def shipped_unet(cfg: RunConfig) -> Path | None:
    """The label-free U-Net the project ships for the config's embedded dataset and ratio, if any."""
    path = PRETRAINED / f"{cfg.dataset}-{pct_name(cfg.ratio)}"
    built = cfg.data_root is None or cfg.dataset in FILE_BUILT  # the same images wherever their files are
    return path if built and cfg.data is None and is_trained(path) else None


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
    train = read_json(Path(folder) / "train.json") if (Path(folder) / "train.json").exists() else {}
    data = train.get("data", {})
    return {"origin": origin, "data": data, "steps": train.get("steps"),
            "bias_knowledge": data.get("bias_knowledge"),  # None: not recorded (a U-Net from elsewhere)
            "weights_sha256": weights_digest(folder)}


class Run:
    """A run folder and its stages. ``Run(folder, cfg).all()`` does everything; each stage resumes.

    ``generate`` replaces the in-process generation stage (same signature as ``generate_in_process``): the Ray
    fan-out over injection actors plugs in here, so this module never imports Ray.
    """

    def __init__(self, folder: str | Path, cfg: RunConfig, device: str = "cpu", progress: bool = True,
                 dataset: Dataset | None = None, generate=None, max_diffusion_seconds: float | None = None):
        self.dir, self.cfg, self.device, self.progress = Path(folder), cfg, device, progress
        check_settings(cfg)  # ranges first: a refused setting costs no data loading and writes nothing
        self.generate = generate or generate_in_process
        self.max_diffusion_seconds = max_diffusion_seconds  # a time budget for training the U-Net here
        self.ds = dataset or dataset_for(cfg, progress)
        validate(cfg, self.ds)
        # your own data: each class's usual bias attribute, where an attribute file gave some (evaluation only)
        tr = self.ds.train
        self.aligned_of = aligned_attributes(tr.labels, tr.bias, self.ds.num_classes) if self.ds.own_data else None
        self._check_unets()
        self.timings: dict[str, float] = {}
        self.repairs: list[str] = []  # stages redone because a file no longer matched its manifest (_done)
        self._claim_folder()

    def _claim_folder(self) -> None:
        lock_folder(self.dir)  # one writer: another process on this folder is refused here, before anything is written
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
                save_json(path, self.cfg.to_dict())  # the folder's config is the last one that ran in it
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        save_json(path, self.cfg.to_dict())

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
                  else read_unet_config(folder)["up_block_types"])
            check_skip_levels(self.cfg.injection.skip_levels, len(up))

    def trains_unet(self) -> bool:
        """Whether this run trains the label-free row's U-Net itself (no ``unet`` given, none shipped)."""
        return "diffinject" in sources_of(run_methods(self.cfg)) and self.unet_source() is None

    def _timed(self, name, fn):
        t0 = time.time()
        out = fn()
        self.timings[name] = round(time.time() - t0, 1)
        return out

    def _done(self, stage: str) -> bool:
        """Whether ``stage`` is sealed and every file its manifest lists still matches it (core.artifacts.check).
        A file that does not is named on stderr and in the report, and the stage is to be redone."""
        found = check(self.dir, stage)
        if found.problems:
            note = f"{stage}: {'; '.join(found.problems)}; redone"
            self.repairs.append(note)
            print(f"diffinject: {note}", file=sys.stderr, flush=True)
            unseal(self.dir, stage)
        return found.done

    # -- stage 1 ---------------------------------------------------------------------------------------------
    def biased(self):
        path = self.dir / "biased" / "model.pt"
        tr = self.ds.train
        if self._done("biased"):
            return load_classifier(path, self.cfg.mining.classifier, self.ds.image_shape, self.ds.num_classes)
        path.parent.mkdir(exist_ok=True)
        checkpoint = path.with_suffix(".ckpt.pt")  # epoch checkpoints: a rerun resumes after the last epoch
        made = self._timed("biased", lambda: train_biased(tr.images, tr.labels, self.ds.num_classes, self.cfg.mining,
                                                          self.cfg.seed, self.device, self.progress, checkpoint))
        save_torch(path, made.model.state_dict())
        save_json(path.parent / "train.json", {"epochs": made.epochs, "training_error": {
            str(e): round(100.0 * err, 2) for e, err in made.errors.items()}})
        seal(self.dir, "biased", ["biased/model.pt", "biased/train.json"])
        checkpoint.unlink(missing_ok=True)
        return made.model.cpu()

    def biased_epochs(self) -> dict:
        """How many epochs the biased model trained, as ``{"biased_epochs": n}`` (empty for a folder made before
        ``biased/train.json`` existed)."""
        path = self.dir / "biased" / "train.json"
        return {"biased_epochs": read_json(path)["epochs"]} if path.exists() else {}

    def mined(self) -> np.ndarray:
        """The mined contents' training-set indices (``biased/mining.json``, mined now if it is not there)."""
        return self.mined_and_weights()[0]

    def mined_and_weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The mined indices and how often each is drawn as a content (``mining.loss_weight_cap``; None: equally
        often), from one read of ``biased/mining.json``."""
        path = self.dir / "biased" / "mining.json"
        if self._done("mining"):
            saved = read_json(path)
            weights = saved.get("weights")  # absent in folders mined before the setting existed: equally often
            return np.array(saved["indices"]), None if weights is None else np.array(weights)
        tr = self.ds.train
        result = mine(self.biased(), tr.images, tr.labels, self.cfg.mining.k,
                      **self.cfg.mining.filters)
        quality = self.scored(result.indices)  # evaluation only
        diagnostics.mined_grid(tr.images, tr.labels, result.indices, self.ds.num_classes,
                               self.dir / "biased" / "mined.png")
        # rounded as saved, so this run and a rerun that reads them back draw the same pairs
        weights = None if result.weights is None else [round(float(w), 4) for w in result.weights]
        save_json(path, {"indices": result.indices.tolist(), "weights": weights, "quality": quality,
                          "seconds": self.timings.get("biased")})  # None where the biased model was trained earlier
        seal(self.dir, "mining", ["biased/mining.json", "biased/mined.png"])
        return result.indices, None if weights is None else np.array(weights)

    # -- stage 2 ---------------------------------------------------------------------------------------------
    def unet_dir(self, method: str = "diffinject") -> Path:
        """The U-Net of a synthetic row: copied from its source, or trained here on the training images only.

        ``diffinject``: ``cfg.unet`` (shipped for this dataset and ratio, a folder, or trained here, resuming on a
        rerun and stopping at ``max_diffusion_seconds`` with :class:`StageIncomplete`); ``diffinject-corpus``: the
        corpus U-Net.
        """
        stage = SYNTHETIC_ROWS[method][0]
        out = self.dir / stage
        if self._done(stage):
            return out
        source = self.row_unet_source(method)
        if source is not None:
            fetch_unet(source, out, self.ds.image_shape[0])
            seal(self.dir, stage, folder_files(self.dir, stage))
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
        seal(self.dir, stage, folder_files(self.dir, stage, skip=("checkpoint.pt",)))  # the checkpoint stays, unsealed
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
        stage = SYNTHETIC_ROWS[method][1]
        folder = self.dir / stage
        path = folder / "samples.pt"
        if self._done(stage):
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
        save_json(folder / "injection.json", info)
        syn.save(path)
        seal(self.dir, stage, [f"{stage}/{name}" for name in ("samples.pt", "injection.json", "injection_grid.png")])
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
        if self._done(f"classifier-{name}"):
            metrics = read_json(metrics_path)
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
        pred = predict(model, ds.test.images, device=self.device).argmax(1)
        if ds.own_data:
            metrics = own_data_metrics(pred, ds.test.labels, ds.test.bias, ds.num_classes, self.aligned_of)
            metrics["disagrees_with_biased"] = round(100.0 * (pred != self.biased_test_predictions).float().mean().item(), 2)
        else:
            metrics = group_metrics(pred, ds.test.labels, ds.test.bias)
        metrics["valid"] = round(100.0 * accuracy(model, ds.valid.images, ds.valid.labels, self.device), 2)
        metrics["params"] = asdict(method.params)  # the hyperparameters it ran with (registry defaults + hparams)
        if "error_set" in trained.info:  # JTT's error set is a mining signal: scored like mining (evaluation only)
            errors = np.array([i for i in trained.info["error_set"] if i < len(ds.train)], dtype=int)
            metrics["error_set"] = self.scored(errors)
        save_torch(folder / f"{name}.pt", model.state_dict())
        save_json(metrics_path, {**metrics, "seconds": self.timings[name]})  # its cost, beside (not in) its results
        seal(self.dir, f"classifier-{name}", [f"classifiers/{name}.pt", f"classifiers/{name}.json"])
        checkpoint.unlink(missing_ok=True)
        return metrics

    def scored(self, indices: np.ndarray) -> dict | None:
        """How many of ``indices`` (training images) are bias-conflicting (:func:`~core.mining.mining_quality`):
        evaluation only; on your own data without training attributes, where it cannot be told, only the count."""
        tr = self.ds.train
        if self.ds.own_data and self.aligned_of is None:
            return {"mined": int(len(indices))}
        return mining_quality(indices, tr.labels, tr.bias, self.aligned_of)

    @cached_property
    def biased_test_predictions(self) -> torch.Tensor:
        """The biased classifier's predictions on the test split: how often a debiased one disagrees with it is
        what can be seen without bias labels."""
        return predict(self.biased(), self.ds.test.images, device=self.device).argmax(1)

    def describe_data(self) -> dict:
        """``data.json``: what the run read (name, classes, sizes, image shape; for your own data its layout, bias
        attribute values and what was done to it), sealed as the ``data`` stage; ``predict`` reads it."""
        ds = self.ds
        about = {"name": ds.name, "classes": ds.class_names, "image_shape": list(ds.image_shape),
                 "train": len(ds.train), "valid": len(ds.valid), "test": len(ds.test), **ds.about}
        path = self.dir / "data.json"
        if not self._done("data") or read_json(path) != about:
            save_json(path, about)
            seal(self.dir, "data", ["data.json"])
        return about

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
        read = lambda path: read_json(path).get("seconds") if path.exists() else None  # noqa: E731
        out = {"biased": read(self.dir / "biased" / "mining.json")}
        if self.trains_unet():  # a copied U-Net cost this run nothing
            out["diffusion"] = read(self.dir / SYNTHETIC_ROWS["diffinject"][0] / "train.json")
        out |= {f"synthetic:{m}": read(self.dir / SYNTHETIC_ROWS[m][1] / "injection.json") for m in synthetic_rows}
        return out | {m: read(self.dir / "classifiers" / f"{m}.json") for m in self.methods()}

    # -- everything ------------------------------------------------------------------------------------------
    def all(self) -> dict:
        """Run (or resume) every stage; write metrics.json and report.md; return the metrics."""
        t0 = time.time()
        data = self.describe_data()
        self.biased()  # every stage is read back (checked against its manifest, redone if need be), used or not
        self.mined()
        synthetic_rows = sources_of(self.methods())
        for m in synthetic_rows:
            self.synthetic(m)
            self.unet_dir(m)  # checked against its manifest (and redone) before the report names its weights
        results = {m: self.method(m) for m in self.methods()}
        metrics = {
            "dataset": {"name": self.ds.name, "ratio": self.cfg.ratio, "train": len(self.ds.train),
                        "valid": len(self.ds.valid), "test": len(self.ds.test), "num_classes": self.ds.num_classes,
                        "image_shape": list(self.ds.image_shape),
                        **({k: data[k] for k in ("classes", "layout", "attributes", "notes")} if self.ds.own_data
                           else {})},
            "seed": self.cfg.seed,
            "mining": {**read_json(self.dir / "biased" / "mining.json")["quality"], **self.biased_epochs()},
            "injection": {m: read_json(self.dir / SYNTHETIC_ROWS[m][1] / "injection.json")
                          for m in synthetic_rows},
            "unet_sources": {m: self.describe_source(m) for m in synthetic_rows},
            "methods": results,
            "seconds_this_invocation": round(time.time() - t0, 1),
            "stage_seconds_this_invocation": self.timings,
            "stage_seconds": self.stage_seconds(synthetic_rows),
            "repairs": self.repairs,
        }
        if self.ds.own_data:  # the shortcut-taker itself, for the rows to be read against
            ds = self.ds
            metrics["biased_classifier"] = own_data_metrics(self.biased_test_predictions, ds.test.labels,
                                                            ds.test.bias, ds.num_classes, self.aligned_of)
        write_report(self.dir, metrics, self.cfg)
        return metrics
