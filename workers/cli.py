"""The ``diffinject`` command line: ``run`` (the whole pipeline; ``--workers N`` fans its generation stage out over
N Ray injection actors), ``train-diffusion`` (stage 2 alone), ``tune`` (a Ray Tune sweep over K and gamma),
``prepare`` (what a Serve config's datasets need, before ``serve run``) and ``export`` (a run's synthetic samples
as an image folder). Flags and YAML files become core's typed settings here; core's errors name settings, and
:func:`main` prints them with the flags that set them. Ray is imported only by the commands that use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
from pathlib import Path

import torch

from diffinject.core.data import DataError, load_dataset, pct_name
from diffinject.core.diffusion import DiffusionConfig, train_diffusion
from diffinject.core.injection import PRECISION_CHOICES, InjectionConfig
from diffinject.core.config import METHODS, PRESETS, make_config, merge, read_settings
from diffinject.core.run import Run, StageIncomplete


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def _out_folder(out: str | Path) -> Path:
    """``--out`` as a folder path, refused in one line when it, or the nearest part of it that exists, is not a
    folder (a file would otherwise end in a traceback from mkdir, or be written into)."""
    out = Path(out)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder" if existing == out else
                         f"--out {out}: {existing} is a file, not a folder")
    return out


def cmd_train_diffusion(args) -> int:
    _threads(args.threads)
    out = _out_folder(args.out)
    settings = read_settings(args.config) if args.config else {}  # checked before the data is loaded
    flags = {"steps": args.steps, "batch_size": args.batch_size, "image_size": args.image_size}
    settings.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(DiffusionConfig)})
    if unknown:
        raise ValueError(f"config {args.config}: unknown diffusion setting(s) {', '.join(unknown)}")
    cfg = DiffusionConfig(**settings)
    if cfg.hard_share > 0:
        raise ValueError("hard_share needs the biased classifier's difficulty weights: train with `diffinject run "
                         "--train-unet --config FILE` instead")
    ds = load_dataset(args.dataset, args.ratio, args.data_root, args.data_seed)
    split = getattr(ds, args.split)
    if split is None:
        raise DataError(f"dataset {args.dataset!r} has no {args.split!r} split")
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text("diffinject " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "\n")
    max_seconds = 60 * args.max_minutes if args.max_minutes else None
    # the corpus of the embedded Colored MNIST spreads the bias evenly: a U-Net trained on it knows the bias
    about = {"dataset": args.dataset, "ratio": pct_name(args.ratio), "split": args.split,
             "bias_knowledge": args.split == "corpus"}
    res = train_diffusion(split.images, cfg, out, seed=args.seed, device=args.device, progress=not args.no_progress,
                          max_seconds=max_seconds, about=about)
    print(json.dumps({"out": str(out), "steps": res.steps, "target_steps": cfg.steps, "seconds": round(res.seconds, 1),
                      "final_loss": round(sum(res.losses[-100:]) / max(1, len(res.losses[-100:])), 5)}))
    return 0


# flag -> config key, for every command that takes run settings (``run`` here, ``tune`` in workers.tune)
TOP_FLAGS = ("dataset", "data_root", "ratio", "seed", "data_seed", "image_size", "methods", "unet")
NESTED_FLAGS = {
    "k": ("mining", "k"), "misclassified_only": ("mining", "misclassified_only"),
    "min_loss": ("mining", "min_loss"), "loss_weight_cap": ("mining", "loss_weight_cap"),
    "gamma": ("injection", "gamma"), "t_edit": ("injection", "t_edit"), "steps": ("injection", "steps"),
    "skip_levels": ("injection", "skip_levels"), "synthetic_ratio": ("injection", "synthetic_ratio"),
    "num_samples": ("injection", "num_samples"), "label_from": ("injection", "label_from"),
    "precision": ("injection", "precision"), "compile": ("injection", "compile"),
    "diffusion_steps": ("diffusion", "steps"), "hard_share": ("diffusion", "hard_share"),
    "epochs": ("classifier", "epochs"),
}


def flag_overrides(args) -> dict:
    """RunConfig overrides from the flags a command was given (a flag the command lacks, or left unset, is skipped)."""
    over: dict = {}
    for name in TOP_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            over[name] = value.split(",") if name == "methods" else value
    for name, (section, key) in NESTED_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            over.setdefault(section, {})[key] = value
    if getattr(args, "train_unet", False):
        over["unet"] = None
    return over


def _overrides(args) -> dict:
    """YAML file first, then the command-line flags that were given."""
    return merge(read_settings(args.config) if args.config else {}, flag_overrides(args))


def cmd_run(args) -> int:
    _threads(args.threads)
    cfg = make_config(args.preset, _overrides(args))
    out = _out_folder(args.out or f"runs/{cfg.dataset}-{pct_name(cfg.ratio)}-seed{cfg.seed}-{args.preset}")
    generate = args.make_generator(args) if getattr(args, "make_generator", None) else None
    max_seconds = 60 * args.max_minutes if args.max_minutes else None
    run = Run(out, cfg, device=args.device, progress=not args.no_progress, generate=generate,
              max_diffusion_seconds=max_seconds)
    try:
        metrics = run.all()
    except StageIncomplete as e:
        print(f"diffinject: stopped: {e}", file=sys.stderr)
        return 3
    width = max(len(m) for m in metrics["methods"])
    print(f"\n{'method':<{width}}  unbiased  aligned  conflicting  worst-group")
    for name, m in metrics["methods"].items():
        print(f"{name:<{width}}  {m['unbiased']:8.2f}  {m['aligned']:7.2f}  {m['conflicting']:11.2f}  {m['worst_group']:11.2f}")
    for name, src in metrics["unet_sources"].items():
        print(f"{name}: U-Net {src['origin']}")
    print(f"\nrun folder: {out}  (report.md, metrics.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffinject", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = sub

    r = sub.add_parser("run", help="the whole pipeline (mine, diffusion, inject, debias) with the --methods rows beside it")
    r.add_argument("--preset", default="default", choices=sorted(PRESETS))
    r.add_argument("--config", default=None, help="YAML file of settings (same keys as the run's config.json)")
    r.add_argument("--dataset", default=None, help="cmnist or corrupted_mnist (embedded), or with --data-root: cmnist, "
                                                   "cifar10c, bffhq, dogs_and_cats")
    r.add_argument("--data-root", default=None, help="folder holding the released benchmark copies")
    r.add_argument("--ratio", type=float, default=None, help="bias-conflict percent: 0.5, 1, 2 or 5")
    r.add_argument("--k", type=int, default=None,
                   help="mined samples per class (default preset: 5 on the embedded benchmarks, 10 elsewhere)")
    r.add_argument("--misclassified-only", action=argparse.BooleanOptionalAction, default=None,
                   help="of the top K, keep those the biased model misclassifies (default: on)")
    r.add_argument("--min-loss", type=float, default=None,
                   help="of those, keep the ones whose CE under the biased model exceeds this (default preset: 4 on the "
                        "embedded benchmarks, else 0, off)")
    r.add_argument("--loss-weight-cap", type=float, default=None,
                   help="draw each mined content in proportion to its CE under the biased model, capped at this "
                        "(default preset: 20 on the embedded Corrupted MNIST, else 0, every content equally often)")
    r.add_argument("--gamma", type=float, default=None, help="injection strength in [0, 1]")
    r.add_argument("--t-edit", type=int, default=None, help="inject at generation steps with t >= t_edit")
    r.add_argument("--steps", type=int, default=None, help="DDIM steps for inversion and generation")
    r.add_argument("--skip-levels", type=int, default=None,
                   help="also inject the skip connections of the N coarsest up blocks with the bottleneck h (default: 0; "
                        "1 on the embedded corrupted_mnist)")
    r.add_argument("--synthetic-ratio", type=float, default=None,
                   help="synthetic samples as a share of the training set "
                        f"(default: {InjectionConfig.synthetic_ratio:g})")
    r.add_argument("--num-samples", type=int, default=None, help="synthetic samples (overrides --synthetic-ratio)")
    r.add_argument("--label-from", choices=["content", "style"], default=None)
    r.add_argument("--precision", choices=list(PRECISION_CHOICES), default=None,
                   help="the U-Net's calls in generation: fp32, bf16, or auto (the default preset's: bf16 on a CPU "
                        "with AVX-512 BF16 or AMX)")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the U-Net's calls in generation: faster after a minute or two of compiling "
                        "(about 25 s once inductor's cache holds the graphs), so it pays from a machine's second "
                        "run, or on large runs (default: off)")
    r.add_argument("--epochs", type=int, default=None, help="epochs of every debiased classifier")
    r.add_argument("--diffusion-steps", type=int, default=None, help="U-Net training steps when one is trained")
    r.add_argument("--hard-share", type=float, default=None,
                   help="U-Net training: share of each batch drawn by the biased model's difficulty (0: uniform)")
    r.add_argument("--unet", default=None, help="the label-free row's U-Net: a trained folder, or 'shipped' (the default: "
                                                "the project's for this embedded dataset and ratio, else train one)")
    r.add_argument("--train-unet", action="store_true", help="train the U-Net on the training images")
    r.add_argument("--max-minutes", type=float, default=None,
                   help="time budget for training the U-Net: stop and save after this long (exit 3); rerun to resume")
    r.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} (default: vanilla, lff, "
                                                   "diffinject, oracle; on the embedded cmnist diffinject-corpus for "
                                                   "diffinject)")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--data-seed", type=int, default=None)
    r.add_argument("--image-size", type=int, default=None, help="folder datasets: resize images on load")
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<pct>-seed<seed>-<preset>)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--workers", type=int, default=0,
                   help="fan the generation stage out over N Ray injection actors (0: in this process)")
    r.add_argument("--worker-threads", type=int, default=1, help="torch CPU threads per injection actor")
    r.set_defaults(func=cmd_run, make_generator=_generator)

    t = sub.add_parser("train-diffusion", help="train (or resume) a DDPM U-Net with P2 weighting on a dataset's images")
    t.add_argument("--dataset", default="cmnist", help="cmnist or corrupted_mnist (embedded), or a folder dataset")
    t.add_argument("--data-root", default=None, help="folder holding the released benchmark copies (default: embedded cmnist)")
    t.add_argument("--ratio", type=float, default=1.0, help="bias-conflict percent: 0.5, 1, 2 or 5")
    t.add_argument("--data-seed", type=int, default=0)
    t.add_argument("--split", default="train", choices=["train", "corpus"], help="which images to train on (never valid/test)")
    t.add_argument("--config", default=None, help="YAML file of DiffusionConfig settings (architecture, P2, EMA, lr, ...)")
    t.add_argument("--steps", type=int, default=None, help=f"training steps (default {DiffusionConfig.steps})")
    t.add_argument("--batch-size", type=int, default=None, help=f"default {DiffusionConfig.batch_size}")
    t.add_argument("--image-size", type=int, default=None, help=f"default {DiffusionConfig.image_size}")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="time budget: stop and save after this long; rerunning resumes towards --steps")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--out", required=True, help="model folder; rerunning resumes from its checkpoint")
    t.set_defaults(func=cmd_train_diffusion)
    from . import tune  # light: Ray is imported only when a sweep runs

    tune.add_parser(sub)
    prep = sub.add_parser("prepare", help="train what the datasets registered in a Serve config need (U-Net, "
                                          "biased classifier) into their run folders, before `serve run`")
    prep.add_argument("config", help="the Serve config, e.g. deploy/serve.yaml (run from the folder `serve run` uses)")
    prep.set_defaults(func=cmd_prepare)
    exp = sub.add_parser("export", help="write a run's synthetic samples as an image folder "
                                        "(DIR/{label}/{name}.png) with manifest.csv, for your own training code")
    exp.add_argument("run_dir", help="a finished run folder (diffinject run --out)")
    exp.add_argument("--to", required=True, help="a new (or empty) folder")
    exp.add_argument("--with-real", action="store_true", help="add the training images: DIR is the debiased training set")
    exp.add_argument("--corpus", action="store_true", help="the diffinject-corpus row's samples instead of the label-free ones")
    exp.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    from diffinject.core.export import export_run

    done = export_run(args.run_dir, args.to, args.with_real, "synthetic-corpus" if args.corpus else "synthetic")
    print(f"{done.synthetic} synthetic and {done.real} real images in {done.folder} (manifest.csv lists them)")
    return 0


def cmd_prepare(args) -> int:
    """Every registered dataset of the config's diffinject applications: its U-Net (trained, resumable, or copied
    from a shipped or given folder) and its biased classifier, in the run folder the service will read."""
    from .prepare import prepare, registered_in

    for record in registered_in(read_settings(args.config, "Serve config"), str(args.config)):
        prepare(record)
        print(f"{record.name}: U-Net {record.unet}, biased classifier {record.biased}", flush=True)
    return 0


def _generator(args):
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers} must be 0 or more")
    if args.workers == 0:
        return None
    from .injector import ray_generator

    return ray_generator(args.workers, args.worker_threads)


def as_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """Core's message with the settings it names (``data_root``) written as the flags that set them
    (``--data-root``, ``mining.min_loss`` as ``--min-loss``): the multi-word ones only, so plain words such as
    "steps" stay prose."""
    flags = {a.dest: a.option_strings[-1] for sub in parser.commands.choices.values() for a in sub._actions
             if a.option_strings and "_" in a.dest and a.option_strings[-1].startswith("--")}
    return re.sub(r"\b(?:[a-z]+\.)?(" + "|".join(map(re.escape, flags)) + r")\b", lambda m: flags[m.group(1)], message) \
        if flags else message


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"diffinject: error: {as_flags(str(e), parser)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
