"""The ``diffinject`` command line: ``run``, ``train-diffusion``, ``tune``, ``prepare`` and ``export``.

Flags and YAML files become core's typed settings here (:mod:`workers.flags`); core's errors name settings, and
:func:`main` prints them with the flags that set them. Every error ends the command in one line on stderr: exit 2
for bad input (a flag, a setting, a path), 1 for the environment (a full disk, no permission, a corrupt file) and
130 for Ctrl-C; ``--debug`` shows the traceback instead. Ray is imported only by the commands that use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import shlex
import sys
import textwrap
from pathlib import Path

import torch

from diffinject.core.artifacts import CorruptFile, save_text
from diffinject.core.config import PRESETS, check_types, make_config, merge, read_run_settings, read_settings
from diffinject.core.data import DataError, load_dataset, pct_name
from diffinject.core.diffusion import DiffusionConfig, train_diffusion
from diffinject.core.hspace import SettingError
from diffinject.core.lock import lock_folder
from diffinject.core.report import table_columns
from diffinject.core.run import Run, StageIncomplete
from .flags import RUN_FLAGS, add_run_flags, at_least, flag_of, flag_overrides, seed_value


def _threads(n: int | None) -> None:
    if n is not None:
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
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(DiffusionConfig)})
    if unknown:
        raise ValueError(f"config {args.config}: unknown diffusion setting(s) {', '.join(unknown)}")
    check_types(settings, str(args.config), DiffusionConfig)
    flags = {"steps": args.steps, "batch_size": args.batch_size, "image_size": args.image_size}
    settings.update({k: v for k, v in flags.items() if v is not None})
    cfg = DiffusionConfig(**settings)
    if cfg.hard_share > 0:
        raise ValueError("hard_share needs the biased classifier's difficulty weights: train with `diffinject run "
                         "--train-unet --config FILE` instead")
    ds = load_dataset(args.dataset, args.ratio, args.data_root, args.data_seed)
    split = getattr(ds, args.split)
    if split is None:
        raise DataError(f"dataset {args.dataset!r} has no {args.split!r} split")
    lock_folder(out)  # one writer, as for a run folder
    save_text(out / "command.txt", "diffinject " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "\n")
    max_seconds = 60 * args.max_minutes if args.max_minutes else None
    # the corpus of the embedded Colored MNIST spreads the bias evenly: a U-Net trained on it knows the bias
    about = {"dataset": args.dataset, "ratio": pct_name(args.ratio), "split": args.split,
             "bias_knowledge": args.split == "corpus"}
    res = train_diffusion(split.images, cfg, out, seed=args.seed, device=args.device, progress=not args.no_progress,
                          max_seconds=max_seconds, about=about)
    print(json.dumps({"out": str(out), "steps": res.steps, "target_steps": cfg.steps, "seconds": round(res.seconds, 1),
                      "final_loss": round(sum(res.losses[-100:]) / max(1, len(res.losses[-100:])), 5)}))
    return 0


def _overrides(args) -> dict:
    """YAML file first, then the command-line flags that were given."""
    return merge(read_run_settings(args.config) if args.config else {}, flag_overrides(args))


def cmd_run(args) -> int:
    _threads(args.threads)
    cfg = make_config(args.preset, _overrides(args))
    name = cfg.dataset if cfg.data is not None else f"{cfg.dataset}-{pct_name(cfg.ratio)}"
    out = _out_folder(args.out or f"runs/{name}-seed{cfg.seed}-{args.preset}")
    generate = args.make_generator(args) if getattr(args, "make_generator", None) else None
    max_seconds = 60 * args.max_minutes if args.max_minutes else None
    run = Run(out, cfg, device=args.device, progress=not args.no_progress, generate=generate,
              max_diffusion_seconds=max_seconds)
    try:
        metrics = run.all()
    except StageIncomplete as e:
        print(f"diffinject: stopped: {e}", file=sys.stderr)
        return 3
    columns = [c for c in table_columns(metrics) if c != "valid"]
    rows = {**({"biased (miner)": metrics["biased_classifier"]} if "biased_classifier" in metrics else {}),
            **metrics["methods"]}
    width = max(map(len, rows))
    print(f"\n{'method':<{width}}  " + "  ".join(c.replace("_", "-") for c in columns))
    for name, m in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{'' if m.get(c) is None else f'{m[c]:.2f}':>{len(c)}}"
                                               for c in columns))
    for name, src in metrics["unet_sources"].items():
        print(f"{name}: U-Net {src['origin']}")
    print(f"\nrun folder: {out}  (report.md, metrics.json)")
    return 0


MAIN_HELP = """Debias an image classifier without bias labels. A biased classifier finds the training images that
contradict the shortcut, a diffusion model (DiffInject) makes more of them by injecting their content into other
images' style, and the classifiers trained with them are compared with the usual baselines."""

MAIN_EXAMPLES = """examples:
  diffinject run                                  # the everyday run on the embedded Colored MNIST
  diffinject run --dataset corrupted_mnist --ratio 0.5
  diffinject run --data path/to/images                # your own images: train/<class>/*, optional val/, test/
  diffinject export runs/cmnist-1pct-seed0-default --to synthetic/
  diffinject predict runs/images-seed0-default photo.jpg   # a run's debiased classifier on new images

'diffinject COMMAND --help' shows each command's options."""

PRESET_HELP = ("settings to start from: default (the everyday run), table (the published tables' settings), quick "
               "(a one-minute smoke run), paper (the paper's settings, for a GPU)")


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors in one line (and exit 2), like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"diffinject: error: {message} (see '{self.prog} --help')\n")


DEBUG_HELP = "on an error, show the traceback instead of one line"


def _command(sub, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=textwrap.fill(description, 100),
                       epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)  # after the command too
    return p


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="diffinject", description=MAIN_HELP, epilog=MAIN_EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p.commands = sub

    r = _command(sub, "run", "mine, make synthetic images, train and compare the debiased classifiers",
                 "Run the whole method in one run folder: train a biased classifier and mine the images it gets "
                 "wrong, make synthetic images with the diffusion model, train each method's classifier and write "
                 "report.md and metrics.json. Rerunning the same command resumes where it stopped.",
                 "diffinject run --dataset corrupted_mnist --ratio 1 --methods vanilla,lff,diffinject")
    r.add_argument("--preset", default="default", choices=list(PRESETS), help=PRESET_HELP)
    r.add_argument("--config", default=None, help="YAML file of settings, with the keys of a run's config.json")
    add_run_flags(r, RUN_FLAGS)
    r.add_argument("--train-unet", action="store_true", help="train the U-Net on the training images here")
    r.add_argument("--max-minutes", type=at_least(0, float, strict=True), default=None,
                   help="time budget for training the U-Net: stop and save after this long (exit 3); rerun to resume")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads")
    r.add_argument("--out", default=None, help="run folder (default: runs/DATASET-PCT-seedSEED-PRESET)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--workers", type=at_least(0), default=0,
                   help="make the synthetic images on N Ray workers (default: 0, in this process)")
    r.add_argument("--worker-threads", type=at_least(1), default=1, help="torch CPU threads per worker (default: 1)")
    r.set_defaults(func=cmd_run, make_generator=_generator)

    t = _command(sub, "train-diffusion", "train a diffusion U-Net on a dataset's images",
                 "Train (or resume) a DDPM U-Net on a dataset's training images, to give a run with --unet. "
                 "Rerunning with the same --out resumes from its checkpoint.",
                 "diffinject train-diffusion --dataset corrupted_mnist --ratio 1 --steps 2000 --out unets/cm1")
    t.add_argument("--dataset", default="cmnist", help=f"{RUN_FLAGS['dataset'].help} (default: %(default)s)")
    t.add_argument("--data-root", default=None, help=RUN_FLAGS["data_root"].help)
    t.add_argument("--ratio", type=float, default=1.0, help=f"{RUN_FLAGS['ratio'].help} (default: %(default)s)")
    t.add_argument("--data-seed", type=seed_value, default=0, help="the embedded data's draw (default: %(default)s)")
    t.add_argument("--split", default="train", choices=["train", "corpus"],
                   help="which images to train on: train, or the embedded Colored MNIST's colour-balanced corpus "
                        "(a U-Net that knows the bias) (default: %(default)s)")
    t.add_argument("--config", default=None, help="YAML file of U-Net settings (architecture, learning rate, ...)")
    t.add_argument("--steps", type=at_least(1), default=None, help=f"training steps (default: {DiffusionConfig.steps})")
    t.add_argument("--batch-size", type=at_least(1), default=None, help=f"default: {DiffusionConfig.batch_size}")
    t.add_argument("--image-size", type=at_least(8), default=None, help=f"default: {DiffusionConfig.image_size}")
    t.add_argument("--max-minutes", type=at_least(0, float, strict=True), default=None,
                   help="time budget: stop and save after this long; rerunning resumes towards --steps")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--seed", type=seed_value, default=0, help="default: %(default)s")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads")
    t.add_argument("--out", required=True, help="the U-Net's folder")
    t.set_defaults(func=cmd_train_diffusion)

    from . import tune  # light: Ray is imported only when a sweep runs

    tune.add_parser(sub, _command)
    prep = _command(sub, "prepare", "train what a Serve config's datasets need, before serving them",
                    "Train (or copy) the U-Net and the biased classifier of every dataset registered in a Serve "
                    "config, into the run folders the service reads. Run it from the folder 'serve run' uses.",
                    "diffinject prepare deploy/serve.yaml")
    prep.add_argument("config", help="the Serve config")
    prep.set_defaults(func=cmd_prepare)
    exp = _command(sub, "export", "write a run's synthetic images as an image folder",
                   "Write a finished run's synthetic images as DIR/LABEL/NAME.png with manifest.csv, for your own "
                   "training code.",
                   "diffinject export runs/cmnist-1pct-seed0-default --to synthetic/ --with-real")
    exp.add_argument("run_dir", help="a finished run folder")
    exp.add_argument("--to", required=True, help="a new (or empty) folder")
    exp.add_argument("--with-real", action="store_true",
                     help="add the training images too: the folder is then the debiased training set")
    exp.add_argument("--corpus", action="store_true",
                     help="the diffinject-corpus row's images instead of the label-free ones")
    exp.set_defaults(func=cmd_export)
    pred = _command(sub, "predict", "name the classes of images with a run's debiased classifier",
                    "Print each image's class as a finished run's classifier sees it (default: the label-free "
                    "DiffInject row), one 'IMAGE<TAB>CLASS' line per image. Images are read as the run read its "
                    "data: resized and centre-cropped to its size.",
                    "diffinject predict runs/pets-seed0-default photos/*.jpg")
    pred.add_argument("run_dir", help="a finished run folder")
    pred.add_argument("images", nargs="+", help="image files, or folders of them")
    pred.add_argument("--method", default=None, help="which row's classifier (default: diffinject)")
    pred.set_defaults(func=cmd_predict)
    return p


def cmd_predict(args) -> int:
    from diffinject.core.predict import image_files, load_classifier

    classifier, files = load_classifier(args.run_dir, args.method), image_files(args.images)
    for start in range(0, len(files), 256):
        batch = files[start : start + 256]
        for path, name in zip(batch, classifier.predict(batch)):
            print(f"{path}\t{name}")
    return 0


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
    if args.workers == 0:
        return None
    from .injector import ray_generator

    return ray_generator(args.workers, args.worker_threads)


def as_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """Core's message with the settings it names (``data_root``) written as the flags that set them
    (``--data-root``, ``mining.min_loss`` as ``--min-loss``): the multi-word ones only, so plain words such as
    "steps" stay prose, and not where quoted (a key as a file spelt it)."""
    flags = {a.dest: next(o for o in a.option_strings if o.startswith("--"))
             for sub in parser.commands.choices.values() for a in sub._actions
             if "_" in a.dest and any(o.startswith("--") for o in a.option_strings)}
    return re.sub(r"(?<!')\b(?:[a-z]+\.)?(" + "|".join(map(re.escape, flags)) + r")\b(?!')",
                  lambda m: flags[m.group(1)], message) if flags else message


ENVIRONMENT = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.EIO: "input/output error"}


def _cause(e: BaseException) -> BaseException:
    """The error a Ray task raised (a ``RayTaskError`` carries it as ``cause``), else ``e``."""
    cause = getattr(e, "cause", None)
    return _cause(cause) if isinstance(cause, BaseException) else e


def explain(e: BaseException, parser: argparse.ArgumentParser) -> tuple[str, int]:
    """An error as the one line the command prints and its exit code: 2 for input, 1 for the environment."""
    e = _cause(e)
    if isinstance(e, SettingError) and flag_of(e.field):  # "classifier.epochs 0 ..." as "--epochs 0 ..."
        return str(e).replace(e.field, flag_of(e.field), 1), 2
    if isinstance(e, (DataError, ValueError, FileNotFoundError)):
        return as_flags(str(e), parser), 2
    if isinstance(e, CorruptFile):
        return f"{e}; delete it (or its run folder) if rerunning cannot redo it", 1
    if isinstance(e, OSError):
        what = ENVIRONMENT.get(e.errno, e.strerror or (str(e).splitlines() or [""])[0])
        where = f"{e.filename}: " if e.filename else ""
        again = "; free some space and rerun the same command to resume" if e.errno in (errno.ENOSPC, errno.EDQUOT) \
            else ""
        return f"{where}{what}{again}", 1
    first = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first} (rerun with --debug for the traceback)", 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader of stdout went away (| head): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("diffinject: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every error becomes one line
        if args.debug:
            raise
        message, code = explain(e, parser)
        print(f"diffinject: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
