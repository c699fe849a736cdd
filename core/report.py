"""What a finished run writes for people and for tables: ``metrics.json`` and ``report.md``."""

from __future__ import annotations

from pathlib import Path

from . import diagnostics
from . import methods as registry
from .artifacts import save_json, save_text
from .config import SYNTHETIC_ROWS, RunConfig


def write_report(folder: Path, metrics: dict, cfg: RunConfig) -> None:
    """``folder/metrics.json`` and ``folder/report.md`` (:func:`render_report`)."""
    save_json(Path(folder) / "metrics.json", metrics)
    save_text(Path(folder) / "report.md", render_report(metrics, cfg))


def bias_knowledge_phrase(knows: bool | None) -> str:
    """How reports and tables say whether a U-Net was built with knowledge of the bias."""
    return {True: "built with knowledge of the bias", False: "no knowledge of the bias",
            None: "not recorded whether it used knowledge of the bias"}[knows]


METRIC_COLUMNS = ("unbiased", "aligned", "conflicting", "worst_group", "valid")
# your own data: those every row has (group and aligned columns need bias attributes)
OWN_DATA_COLUMNS = ("accuracy", "worst_class", "group_balanced", "worst_group", "aligned", "conflicting",
                    "disagrees_with_biased", "valid")


def table_columns(metrics: dict) -> tuple[str, ...]:
    """The columns of a run's results table: the benchmarks' fixed ones, or those your own data's rows all have."""
    if "layout" not in metrics["dataset"]:
        return METRIC_COLUMNS
    rows = list(metrics["methods"].values())
    return tuple(c for c in OWN_DATA_COLUMNS if all(r.get(c) is not None for r in rows))


NO_ATTRIBUTES = ("No bias attributes were given, so which images contradict the shortcut cannot be told: the table "
                 "gives each classifier's accuracy, its worst class, and how often it disagrees with the biased "
                 "classifier (one that leans on the same shortcut agrees with it more). Mining precision cannot be "
                 "known either. An attribute file (`--attributes FILE.csv`, `file,attribute`), even for the test "
                 "images alone, adds group-balanced and worst-group accuracy.")
NAMES = {name: method.label for name, method in registry.REGISTRY.items()}  # the tables' row labels


def render_report(metrics: dict, cfg: RunConfig) -> str:
    ds = metrics["dataset"]
    columns, own = table_columns(metrics), "layout" in ds
    if own:
        lines = [f"# DiffInject run: {ds['name']} ({ds['layout']}, {ds['train']} training images, "
                 f"{len(ds['classes'])} classes), seed {metrics['seed']}", "",
                 "Test accuracy (%); the checkpoint of each method was chosen on the validation split. "
                 + " ".join(n[0].upper() + n[1:] + "." for n in ds["notes"]), ""]
        lines += [NO_ATTRIBUTES, ""] if not ds["attributes"] else [
            f"Bias attributes ({', '.join(ds['attributes'])}) were read for these columns only: groups are (class, "
            "attribute) pairs.", ""]
    else:
        lines = [f"# DiffInject run: {ds['name']} at {ds['ratio']:g} % conflicts, seed {metrics['seed']}", "",
                 "Test accuracy (%) on the unbiased test split; the checkpoint of each method was chosen on the "
                 "validation split.", ""]
    lines += ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    rows = dict(metrics["methods"])
    if "biased_classifier" in metrics:
        rows = {"biased classifier (GCE, the miner)": metrics["biased_classifier"], **rows}
    for name, m in rows.items():
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(
            "" if m.get(c) is None else f"{m[c]:.2f}" for c in columns) + " |")
    for name, src in metrics.get("unet_sources", {}).items():
        lines.append(f"\n{NAMES.get(name, name)}: U-Net {src['origin']}; {bias_knowledge_phrase(src['bias_knowledge'])}.")
    q = metrics["mining"]
    quality = (f"precision {q['precision']:.1f} %, recall {q['recall']:.1f} % of the {q['true_conflicts']} true "
               "bias-conflicting training samples (bias labels read for this line only)." if "precision" in q else
               "how many contradict the shortcut cannot be known without bias attributes for the training images.")
    trained = (f" The biased classifier trained {q['biased_epochs']} epochs (`biased/train.json`)."
               if "biased_epochs" in q else "")
    lines += ["", f"## Mining (K = {cfg.mining.k} per class)", "", f"{q['mined']} samples mined; {quality}{trained}",
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
    if metrics.get("repairs"):  # stages whose files no longer matched their manifest (core.artifacts)
        lines += ["", "## Redone on this invocation", "", "These stages' files no longer matched their manifests; each "
                  "stage was redone from its last good checkpoint (its results are those of an uninterrupted run):", ""]
        lines += [f"- {note}" for note in metrics["repairs"]]
    return "\n".join(lines) + "\n"
