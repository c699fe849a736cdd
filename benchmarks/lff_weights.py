"""Where LfF's relative-difficulty weights go when it learns from real + synthetic samples.

LfF weights each sample's loss by W = L_b / (L_b + L_d): samples its biased model finds hard get the weight. The
synthetic samples are made to be hard for a biased model, so on real + synthetic they may take the weight that
LfF alone gives the real bias-conflicting samples. For finished run folders, this retrains ``lff`` (the real
training split) and ``lff+diffinject`` (real + the run's synthetic samples) with the run's settings, seed and
recorded hyperparameters (so a run from before ``cap_extra_weight`` existed retrains uncapped), and
records per epoch the mean weight and the share of all weight that falls on three groups: synthetic samples, real
bias-conflicting samples and real bias-aligned samples. The groups are told apart with the bias labels, read
here for the tally only: the training itself sees them blanked, as in the pipeline.

    python benchmarks/lff_weights.py runs/bench-lf-shared/default-5pct-seed0

Writes ``benchmarks/results/lff_weights.{md,json}``: per (run, method) the last epoch's tally, every epoch's, and
the retrained model's unbiased test accuracy beside the one the run recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch


from debias_table import command_line  # sibling script (its folder is on sys.path)
from diffinject.core import methods as registry
from diffinject.core.classifier import group_metrics, predict
from diffinject.core.run import Run, recorded_params, saved_config
from diffinject.core.stages import fit_method

RESULTS = Path(__file__).parent / "results"
GROUPS = ("synthetic", "real_conflicting", "real_aligned")


class WeightTally:
    """Wraps an LfF's ``weights``: sums each group's weights over an epoch (``close`` ends one)."""

    def __init__(self, weights, group: torch.Tensor):
        self.weights, self.group, self.epochs = weights, group, []
        self._sum, self._count = torch.zeros(len(GROUPS), dtype=torch.float64), torch.zeros(len(GROUPS))

    def __call__(self, ema_b, ema_d, idx, from_extra):
        w = self.weights(ema_b, ema_d, idx, from_extra)
        g = self.group[idx]
        self._sum.index_add_(0, g, w.double().cpu())
        self._count.index_add_(0, g, torch.ones(len(g)))
        return w

    def close(self, *_):
        total = self._sum.sum().item()
        self.epochs.append({name: {"mean_weight": round(self._sum[i].item() / max(self._count[i].item(), 1.0), 4),
                                   "weight_share": round(100.0 * self._sum[i].item() / total, 2),
                                   "sample_share": round(100.0 * self._count[i].item() / self._count.sum().item(), 2)}
                            for i, name in enumerate(GROUPS) if self._count[i] > 0})
        self._sum.zero_()
        self._count.zero_()


def measure(folder: Path, method_name: str) -> dict:
    cfg = saved_config(folder)
    run = Run(folder, cfg, progress=False)
    recorded = folder / "classifiers" / f"{method_name}.json"
    params = cfg.hparams.get(method_name)
    if recorded.exists():  # retrain as the run did, under the hyperparameters it recorded
        known = {f.name for f in fields(registry.REGISTRY[method_name].Params)}
        params = {k: v for k, v in recorded_params(json.loads(recorded.read_text())).items() if k in known}
    ds, method = run.ds, registry.get(method_name, params)
    extra = run.extra_data(method.extra)
    n_extra = 0 if extra is None else len(extra[1])
    conflicting = (ds.train.labels != ds.train.bias).long()  # bias labels: for the tally only
    group = torch.cat([torch.where(conflicting.bool(), 1, 2), torch.zeros(n_extra, dtype=torch.long)])
    tally = method.weights = WeightTally(method.weights, group)  # this instance only
    trained = fit_method(method, ds.train, extra, ds.valid, ds.num_classes, cfg.classifier, cfg.seed,
                         progress=False, on_epoch=tally.close)
    metrics = group_metrics(predict(trained.model, ds.test.images).argmax(1), ds.test.labels, ds.test.bias)
    row = {"run": f"{folder.parent.name}/{folder.name}", "method": method_name, "params": asdict(method.params),
           "last_epoch": tally.epochs[-1], "epochs": tally.epochs, "unbiased": metrics["unbiased"],
           "recorded_unbiased": json.loads(recorded.read_text())["unbiased"] if recorded.exists() else None}
    print(json.dumps({k: v for k, v in row.items() if k != "epochs"}), flush=True)
    return row


def render(rows: list[dict]) -> str:
    lines = ["LfF's relative-difficulty weights in the last epoch: share of all weight / share of samples / mean "
             "weight, per group (bias labels read for this tally only).", "",
             "| run | method | " + " | ".join(GROUPS) + " | unbiased (recorded) |", "|---" * (len(GROUPS) + 3) + "|"]
    for r in rows:
        cells = [f"{g['weight_share']:.1f} % / {g['sample_share']:.1f} % / {g['mean_weight']:.3f}"
                 if (g := r["last_epoch"].get(name)) else "-" for name in GROUPS]
        rec = "-" if r["recorded_unbiased"] is None else f"{r['recorded_unbiased']:.1f}"
        capped = " (capped)" if r["params"].get("cap_extra_weight") else ""
        lines.append(f"| {r['run']} | {r['method']}{capped} | " + " | ".join(cells) + f" | {r['unbiased']:.1f} ({rec}) |")
    return "\n".join(lines + ["", f"Command: `{command_line()}`."]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished run folders (with synthetic samples)")
    p.add_argument("--methods", default="lff,lff+diffinject")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark runs used 1)")
    p.add_argument("--name", default="lff_weights")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(Path(folder).expanduser(), m) for folder in args.runs for m in args.methods.split(",")]
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command_line(), "rows": rows}, indent=1))
    (RESULTS / f"{args.name}.md").write_text(render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
