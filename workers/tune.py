"""``diffinject tune``: a Ray Tune sweep over K (mined samples per class) and gamma (injection strength).

The driver prepares one base run folder, ``<out>/base``, with core's ``Run``: the GCE biased classifier and
the U-Net are trained there once. Every trial loads them (it never retrains them), mines its top-K, injects
with its gamma (every other setting from the base config, same seed) and trains the debiased classifier of
``--method`` (any registered method that learns from the label-free synthetic samples: ``diffinject``,
``lff+diffinject``, ...), with core's own stage functions (``synthesize``, ``fit_method``), reporting the validation
accuracy after each epoch so ASHA can stop weak trials early.

The config is chosen by best validation accuracy alone. Trials get the training and validation splits with
their bias labels blanked, and never the test split; the driver reads test and bias labels once, after the
choice, to report the chosen model's test metrics.

    <out>/base/                the shared run folder (config.json, biased/model.pt, unet/)
    <out>/ray/sweep-<time>/    Tune's experiment folder; models/k<K>-gamma<g>.pt for each completed trial
    <out>/trials.csv, .md      one row per trial: K, gamma, best valid accuracy, epochs run, stopped early
    <out>/best.json            the chosen K and gamma, its validation accuracy, its test metrics
    <out>/tune.png             best validation accuracy against gamma, one line per K

On a multi-node cluster (``RAY_ADDRESS``) ``<out>`` must be on storage every node sees, as Tune's
``storage_path`` already requires.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffinject.core import methods as registry
from diffinject.core.artifacts import save_figure, save_json, save_text, save_torch
from diffinject.core.classifier import group_metrics, load_classifier, predict
from diffinject.core.config import PRESETS, RunConfig, check_types, make_config, merge, read_settings, validate
from diffinject.core.data import ImageSet, pct_name
from diffinject.core.injection import InjectionConfig
from diffinject.core.mining import mine
from diffinject.core.run import Run
from diffinject.core.stages import fit_method, synthesize
from .flags import add_run_flags, at_least, flag_overrides

GRACE_PERIOD = 2  # ASHA: epochs every trial runs before it can be stopped
REDUCTION_FACTOR = 3  # ASHA: keep the top third at each rung
METRIC = "valid_accuracy"  # the only metric the choice reads (best so far, in [0, 1])
DEVICE = "cpu"
COLUMNS = ("k", "gamma", "valid_accuracy", "epochs", "stopped_early", "error")


# -- the grid -----------------------------------------------------------------------------------------------


def parse_list(text: str, kind: type, flag: str) -> list:
    """``"5,10"`` -> ``[5, 10]`` (``kind`` int or float); a bad item is a one-line ValueError naming ``flag``."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        return [kind(s) for s in items]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{flag} {text!r} must be a comma list of {what}") from None


def read_grid(path: str) -> dict:
    """A YAML grid file: ``k: [...]``, ``gamma: [...]`` and optional ``config:`` (RunConfig overrides)."""
    data = read_settings(path, what="grid")
    unknown = sorted(set(data) - {"k", "gamma", "config"})
    if unknown:
        raise ValueError(f"grid {path}: unknown key {unknown[0]!r} (expected k, gamma, config)")
    data["config"] = data.get("config") or {}
    if not isinstance(data["config"], dict):
        raise ValueError(f"grid {path}: config must be a mapping of RunConfig settings")
    check_types(data["config"], f"grid {path}: config")
    for key in ("k", "gamma"):
        if key in data and not isinstance(data[key], list):
            data[key] = [data[key]]
    return data


def check_grid(ks: list, gammas: list) -> tuple[list[int], list[float]]:
    """Non-empty lists, K integers >= 1, gamma in [0, 1]; duplicates dropped, order kept. Else ValueError."""
    for name, values in (("k", ks), ("gamma", gammas)):
        if not values:
            raise ValueError(f"empty grid: no {name} values (give --{name} or '{name}:' in --grid)")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"K {k!r} is invalid: K (mined samples per class) must be an integer >= 1")
    for g in gammas:
        if isinstance(g, bool) or not isinstance(g, (int, float)):
            raise ValueError(f"gamma {g!r} is not a number")
        InjectionConfig(gamma=g).validate()  # its range, written once in core
    return list(dict.fromkeys(ks)), list(dict.fromkeys(float(g) for g in gammas))


def default_grid(cfg: RunConfig) -> dict[str, list]:
    """The grid when neither the flags nor the grid file give one: the run's K, twice and four times it, and the
    run's gamma with two weaker ones (0.2 apart, at least 0)."""
    k, gamma = cfg.mining.k, cfg.injection.gamma
    return {"k": [k, 2 * k, 4 * k], "gamma": sorted({round(max(0.0, gamma - d), 2) for d in (0.4, 0.2, 0.0)})}


def trial_config(cfg: RunConfig, k: int, gamma: float) -> RunConfig:
    """The base config with one grid point's K and gamma."""
    return replace(cfg, mining=replace(cfg.mining, k=k), injection=replace(cfg.injection, gamma=gamma))


def tag(k: int, gamma: float) -> str:
    return f"k{k}-gamma{gamma:g}"


# -- one trial (runs in a Ray worker) --------------------------------------------------------------------------


def trial(params: dict, *, cfg: RunConfig, method: str, base: str, models: str, train: ImageSet, valid: ImageSet,
          num_classes: int, threads: int) -> None:
    """One Tune trial: mine top-K with the base biased classifier, inject with gamma, train ``method``.

    ``params`` holds the grid point (``k``, ``gamma``); the rest comes from ``tune.with_parameters``. Loads
    ``<base>/biased/model.pt`` and ``<base>/unet`` (a missing one is an error: trials never train them).
    After each epoch it reports ``valid_accuracy`` = best validation accuracy so far, i.e. the score of the
    checkpoint the trial would keep (ASHA compares these, so the best trial of a sweep always runs to the
    end), ``epoch_accuracy`` and ``epoch`` (1-based). A trial that finishes saves its best-validation model
    to ``<models>/<tag>.pt``; one ASHA stops saves nothing. ``train``/``valid`` come with bias labels blanked.
    """
    from ray import tune as ray_tune

    torch.set_num_threads(threads)  # Ray gives a worker one thread
    k, gamma = params["k"], params["gamma"]
    cfg = trial_config(cfg, k, gamma)
    base = Path(base)
    biased = load_classifier(base / "biased" / "model.pt", cfg.mining.classifier, tuple(train.images.shape[1:]),
                             num_classes)
    mined = mine(biased, train.images, train.labels, k, DEVICE, **cfg.mining.filters)
    syn = synthesize(base / "unet", train, mined.indices, cfg.injection, cfg.seed, device=DEVICE, progress=False,
                     weights=mined.weights).samples
    learner = registry.get(method, cfg.hparams.get(method))
    best = 0.0

    def report(epoch: int, acc: float) -> None:
        nonlocal best
        best = max(best, acc)
        ray_tune.report({METRIC: best, "epoch_accuracy": acc, "epoch": epoch + 1})

    trained = fit_method(learner, train, (syn.images, syn.labels), valid,
                         num_classes, cfg.classifier, cfg.seed, DEVICE, progress=False, on_epoch=report)
    save_torch(Path(models) / f"{tag(k, gamma)}.pt", trained.model.state_dict())


# -- the sweep (driver) -------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(num_cpus: int):
    """Use the running Ray session; else join ``RAY_ADDRESS`` or start a local one, and shut down only that."""
    import ray

    started = not ray.is_initialized()
    if started and os.environ.get("RAY_ADDRESS"):
        ray.init()
    elif started:
        ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def sweep(run: Run, ks: list[int], gammas: list[float], out: Path, cpus_per_trial: int = 1, asha: bool = True,
          verbose: int = 1, method: str = "diffinject") -> list[dict]:
    """Run the grid ``ks`` x ``gammas`` as Tune trials on the prepared base ``run``; one row per trial.

    Rows (sorted by K, gamma): ``valid_accuracy`` in percent (None if the trial reported nothing),
    ``epochs`` run, ``stopped_early`` (by ASHA), ``error`` (the exception's last line, or ""), ``model`` (path or None).
    """
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler

    epochs = run.cfg.classifier.epochs
    name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    models = out / "ray" / name / "models"
    models.mkdir(parents=True, exist_ok=True)
    ds = run.ds
    trainable = ray_tune.with_parameters(trial, cfg=run.cfg, method=method, base=str(run.dir.resolve()),
                                         models=str(models), train=ds.train.blind(), valid=ds.valid.blind(),
                                         num_classes=ds.num_classes, threads=cpus_per_trial)
    # stop_last_trials=False: reaching max_t is not a stop; a trial ends by returning, after saving its model
    scheduler = ASHAScheduler(time_attr="epoch", max_t=max(epochs, GRACE_PERIOD),
                              grace_period=GRACE_PERIOD, reduction_factor=REDUCTION_FACTOR,
                              stop_last_trials=False) if asha else None
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(trainable, {"cpu": cpus_per_trial}),
        param_space={"k": ray_tune.grid_search(ks), "gamma": ray_tune.grid_search(gammas)},
        tune_config=ray_tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler),
        run_config=ray_tune.RunConfig(name=name, storage_path=str(out / "ray"), verbose=verbose),
    )
    with contextlib.redirect_stdout(io.StringIO()) if verbose == 0 else contextlib.nullcontext():
        results = tuner.fit()  # Tune prints its experiment header even at verbose 0
    rows = []
    for result in results:
        metrics, (k, gamma) = result.metrics or {}, (result.config["k"], result.config["gamma"])
        done = int(metrics.get("epoch", 0))
        model = models / f"{tag(k, gamma)}.pt"
        rows.append({
            "k": k, "gamma": gamma,
            "valid_accuracy": round(100.0 * metrics[METRIC], 2) if METRIC in metrics else None,
            "epochs": done,
            "stopped_early": result.error is None and done < epochs,
            "error": str(result.error).strip().splitlines()[-1] if result.error else "",
            "model": str(model) if result.error is None and model.exists() else None,
        })
    return sorted(rows, key=lambda r: (r["k"], r["gamma"]))


def choose(rows: list[dict]) -> dict:
    """The trial with the best validation accuracy (ties: first in grid order). Reads no test or bias label."""
    scored = [r for r in rows if r["valid_accuracy"] is not None and not r["error"]]
    if not scored:
        errors = [r["error"] for r in rows if r["error"]]
        raise ValueError(f"no trial reported a validation accuracy{': ' + errors[0] if errors else ''}")
    best = max(scored, key=lambda r: r["valid_accuracy"])
    if best["model"] is None:  # cannot happen with best-so-far reporting (see trial); guard the invariant
        raise RuntimeError(f"the chosen trial {tag(best['k'], best['gamma'])} saved no model")
    return best


def evaluate_on_test(run: Run, model_path: str, method: str = "diffinject") -> dict:
    """Group metrics of a saved debiased model on the test split: the sweep's only read of test/bias labels."""
    model = registry.get(method).load(model_path, run.cfg.classifier, run.ds.image_shape, run.ds.num_classes)
    test = run.ds.test
    return group_metrics(predict(model, test.images, device=DEVICE).argmax(1), test.labels, test.bias)


# -- outputs ------------------------------------------------------------------------------------------------


def render_table(rows: list[dict], best: dict) -> str:
    lines = ["| K | gamma | valid acc (%) | epochs | stopped early | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r["valid_accuracy"] is None else f"{r['valid_accuracy']:.2f}"
        note = "chosen" if r is best else (f"error: {r['error']}" if r["error"] else "")
        lines.append(f"| {r['k']} | {r['gamma']:g} | {acc} | {r['epochs']} | {'yes' if r['stopped_early'] else 'no'} "
                     f"| {note} |")
    return "\n".join(lines)


def plot(rows: list[dict], best: dict, path: Path) -> None:
    """Best validation accuracy against gamma, one line per K; stopped trials crossed, the choice starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for k in sorted({r["k"] for r in rows}):
        pts = [(r["gamma"], r["valid_accuracy"]) for r in rows if r["k"] == k and r["valid_accuracy"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"K = {k}")
    stopped = [(r["gamma"], r["valid_accuracy"]) for r in rows
               if r["stopped_early"] and r["valid_accuracy"] is not None]
    if stopped:
        ax.plot(*zip(*stopped), "kx", ms=9, ls="none", label="stopped early")
    ax.plot([best["gamma"]], [best["valid_accuracy"]], "k*", ms=14, ls="none", label="chosen")
    ax.set_xlabel("gamma (injection strength)")
    ax.set_ylabel("best validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)


def write_outputs(out: Path, rows: list[dict], best: dict, summary: dict) -> str:
    """trials.csv, trials.md, best.json, tune.png; returns the markdown table."""
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    save_text(out / "trials.csv", text.getvalue())
    table = render_table(rows, best)
    save_text(out / "trials.md", f"# Tune sweep: K x gamma\n\nChosen by best validation accuracy; "
                                 f"test metrics of the chosen model only.\n\n{table}\n")
    save_json(out / "best.json", summary)
    plot(rows, best, out / "tune.png")
    return table


# -- the command ----------------------------------------------------------------------------------------------


def cmd_tune(args) -> int:
    """Validate the grid, prepare ``<out>/base`` once, sweep, choose by validation accuracy, write, print."""
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = read_grid(args.grid) if args.grid else {}
    if args.cpus_per_trial < 1:
        raise ValueError(f"--cpus-per-trial {args.cpus_per_trial} must be at least 1")
    registry.get(args.method)  # an unknown name: a one-line error
    if args.method not in synthetic_methods():
        raise ValueError(f"--method {args.method!r} does not learn from the label-free synthetic samples, so K and "
                         f"gamma do not reach it; choose one of {', '.join(synthetic_methods())}")
    cfg = make_config(args.preset, merge(grid.get("config") or {}, flag_overrides(args)))
    default = default_grid(cfg)
    ks, gammas = check_grid(parse_list(args.grid_k, int, "--k") if args.grid_k is not None
                            else grid.get("k", default["k"]),
                            parse_list(args.grid_gamma, float, "--gamma") if args.grid_gamma is not None
                            else grid.get("gamma", default["gamma"]))
    if cfg.classifier.epochs < 1:
        raise ValueError(f"epochs {cfg.classifier.epochs} must be at least 1")
    out = Path(args.out or f"runs/tune-{cfg.dataset}-{pct_name(cfg.ratio)}-{args.preset}").resolve()
    run = Run(out / "base", cfg, device=DEVICE, progress=not args.no_progress)
    for k in ks:  # K against the class sizes, before anything is trained
        validate(trial_config(cfg, k, gammas[0]), run.ds)
    run.biased()
    run.unet_dir()
    with ray_session(max(os.cpu_count() or 1, args.cpus_per_trial)):
        rows = sweep(run, ks, gammas, out, args.cpus_per_trial, args.asha, verbose=0 if args.no_progress else 1,
                     method=args.method)
    best = choose(rows)
    summary = {"k": best["k"], "gamma": best["gamma"], "valid_accuracy": best["valid_accuracy"],
               "epochs": best["epochs"], "test": evaluate_on_test(run, best["model"], args.method),
               "method": args.method,
               "chosen_by": "best validation accuracy (test and bias labels never read by the choice)",
               "trials": len(rows), "base": str(run.dir), "model": best["model"]}
    table = write_outputs(out, rows, best, summary)
    t = summary["test"]
    print(f"\n{table}\n\nchosen: K = {best['k']}, gamma = {best['gamma']:g} (valid {best['valid_accuracy']:.2f} %); "
          f"test: unbiased {t['unbiased']:.2f}, aligned {t['aligned']:.2f}, conflicting {t['conflicting']:.2f}, "
          f"worst-group {t['worst_group']:.2f}\nsweep folder: {out}  (trials.md, best.json, tune.png)")
    return 0


def synthetic_methods() -> list[str]:
    """The registered methods that learn from the label-free synthetic samples (the ones K and gamma reach)."""
    return [name for name, m in registry.REGISTRY.items() if m.extra == "diffinject"]


def add_parser(sub, command) -> argparse.ArgumentParser:
    """Register ``diffinject tune`` on the subparsers object ``sub``; ``command`` makes a subcommand's parser with
    its summary, description and example (workers.cli)."""
    t = command(sub, "tune", "choose K and gamma by validation accuracy with a Ray Tune sweep",
                "Sweep K (mined images per class) and gamma (injection strength) with Ray Tune: the biased "
                "classifier and the U-Net are trained once, each trial mines, makes its synthetic images and trains "
                "--method, and the best validation accuracy chooses. Only the chosen model is tested.",
                "diffinject tune --dataset cmnist --ratio 1 --k 5,10 --gamma 0.5,0.9")
    t.add_argument("--preset", default="default", choices=list(PRESETS), help="the settings to start from (see run)")
    t.add_argument("--method", default="diffinject",
                   help=f"the classifier each trial trains: {', '.join(synthetic_methods())} (default: %(default)s)")
    add_run_flags(t, ("dataset", "data_root", "ratio"))
    # dest grid_*: lists for the sweep, not the single run settings flag_overrides reads as k and gamma
    t.add_argument("--k", dest="grid_k", default=None,
                   help="comma list of K, mined images per class (default: the run's K, twice and four times it)")
    t.add_argument("--gamma", dest="grid_gamma", default=None,
                   help="comma list of gamma in [0, 1] (default: the run's gamma and two weaker ones, 0.2 apart)")
    t.add_argument("--grid", default=None, help="YAML file: k: [...], gamma: [...], config: {run settings}")
    add_run_flags(t, ("epochs", "num_samples", "seed"))
    t.add_argument("--cpus-per-trial", type=at_least(1), default=1,
                   help="CPUs (and torch threads) per trial (default: %(default)s)")
    t.add_argument("--asha", action=argparse.BooleanOptionalAction, default=True,
                   help=f"stop weak trials early (ASHA, after {GRACE_PERIOD} epochs) (default: on)")
    t.add_argument("--out", default=None, help="sweep folder (default: runs/tune-DATASET-PCT-PRESET)")
    t.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads of the driver")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_tune)
    return t
