"""End to end: the quick pipeline, its artifacts, resume, reproducibility, bias-label blindness, bad input."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from diffinject.workers.cli import main
from diffinject.core.data import load_dataset
from diffinject.core.methods import REGISTRY
from diffinject.core.config import make_config
from diffinject.core.run import Run

ARTIFACTS = [
    "config.json", "biased/model.pt", "biased/mining.json", "biased/mined.png",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/train.json", "unet/loss.png",
    "synthetic/samples.pt", "synthetic/injection.json", "synthetic/injection_grid.png",
    "classifiers/vanilla.pt", "classifiers/lff.pt", "classifiers/diffinject.pt", "classifiers/oracle.pt",
    "metrics.json", "report.md",
]


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("cmnist", 1.0)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, dataset):
    folder = tmp_path_factory.mktemp("run") / "quick"
    metrics = Run(folder, make_config("quick"), progress=False, dataset=dataset).all()
    return folder, metrics


def test_quick_run_writes_every_artifact(quick_run):
    folder, _ = quick_run
    missing = [a for a in ARTIFACTS if not (folder / a).exists()]
    assert not missing
    for png in ("biased/mined.png", "synthetic/injection_grid.png", "unet/loss.png"):
        with Image.open(folder / png) as im:
            assert im.size[0] > 50 and im.size[1] > 50


def test_quick_run_metrics_are_sane(quick_run):
    folder, metrics = quick_run
    assert metrics == json.loads((folder / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"vanilla", "lff", "diffinject", "oracle"}
    for m in metrics["methods"].values():
        for key in ("unbiased", "aligned", "conflicting", "worst_group", "valid"):
            assert 0.0 <= m[key] <= 100.0
        assert m["worst_group"] <= m["conflicting"] <= 100.0
    # a plain classifier on 99 % aligned data learns the colour shortcut
    assert metrics["methods"]["vanilla"]["aligned"] > metrics["methods"]["vanilla"]["conflicting"] + 20
    mining = metrics["mining"]
    # K = 5 of 10 classes, filtered to the misclassified ones (every class keeps at least one)
    assert 10 <= mining["mined"] <= 5 * 10 and 0 <= mining["precision"] <= 100 and 0 <= mining["recall"] <= 100
    inj = metrics["injection"]["diffinject"]
    assert inj["samples"] == 24 and 0 <= inj["biased_model_wrong"] <= 100
    rep = inj["report"]
    assert rep["colour_reader_test_accuracy"] > 95  # the instruments themselves must be trustworthy
    assert rep["shape_reader_test_accuracy"] > 70
    assert rep["both"] <= min(rep["content_digit"], rep["style_colour"])
    # inclusion-exclusion: (content digit or style colour) and neither cover every sample once
    assert abs(rep["content_digit"] + rep["style_colour"] - rep["both"] + rep["neither"] - 100) < 0.05
    # split by the content's hidden bias label (evaluation only): the two parts recombine into the whole
    parts = rep["by_content"]
    assert abs(parts["true-conflict"]["share"] + parts["aligned"]["share"] - 100) < 0.05
    whole = sum(p["share"] * p.get("content_digit_other_colour", 0.0) for p in parts.values()) / 100
    assert abs(whole - rep["content_digit_other_colour"]) < 0.1
    report = (folder / "report.md").read_text()
    assert "By content (bias labels read for this line only)" in report
    assert "| Vanilla |" in report and "| LfF |" in report and "| DiffInject (label-free) |" in report
    # the row says what its U-Net learnt from
    weights = hashlib.sha256((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert metrics["unet_sources"] == {"diffinject": {
        "origin": "trained in this run on the training split", "steps": 30, "bias_knowledge": False,
        "data": {"dataset": "cmnist", "ratio": "1pct", "split": "train", "hard_share": 0.0, "bias_knowledge": False},
        "weights_sha256": weights[:16]}}  # which model, whatever later lies at its path
    assert "U-Net trained in this run on the training split; no knowledge of the bias" in report


def test_synthetic_samples_are_content_labelled_images(quick_run, dataset):
    folder, _ = quick_run
    syn = torch.load(folder / "synthetic/samples.pt", weights_only=True)
    mined = json.loads((folder / "biased/mining.json").read_text())["indices"]
    assert syn["images"].dtype == torch.uint8 and syn["images"].shape == (24, 3, 28, 28)
    assert set(syn["content"].tolist()) <= set(mined)
    assert torch.equal(syn["labels"], dataset.train.labels[syn["content"]])
    assert (dataset.train.labels[syn["style"]] != syn["labels"]).all()


def test_rerun_resumes_without_recomputing(quick_run, dataset):
    folder, metrics = quick_run
    stamps = {a: (folder / a).stat().st_mtime_ns for a in ARTIFACTS if a not in ("metrics.json", "report.md")}
    run = Run(folder, make_config("quick"), progress=False, dataset=dataset)
    again = run.all()
    assert run.timings == {}  # no stage ran again
    assert again["methods"] == metrics["methods"]
    assert stamps == {a: (folder / a).stat().st_mtime_ns for a in stamps}


def test_lost_stages_are_recomputed_identically(quick_run, dataset, tmp_path):
    """Reproducible from the seed: delete the later stages of a copy and rerun."""
    import shutil

    from diffinject.core.artifacts import seal

    folder, metrics = quick_run
    copy_dir = tmp_path / "copy"
    shutil.copytree(folder, copy_dir)
    shutil.rmtree(copy_dir / "synthetic")
    for name in ("diffinject", "oracle"):
        (copy_dir / f"classifiers/{name}.pt").unlink()
        (copy_dir / f"classifiers/{name}.json").unlink()
    again = Run(copy_dir, make_config("quick"), progress=False, dataset=dataset).all()
    a = torch.load(folder / "synthetic/samples.pt", weights_only=True)
    b = torch.load(copy_dir / "synthetic/samples.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again["methods"] == metrics["methods"]


def test_bias_labels_are_never_read(quick_run, dataset, tmp_path):
    """Shuffle the training split's bias labels: every stage's output is bit-for-bit the same, for every registered
    method, the diffusion training that oversamples the biased model's hard samples (hard_share) and the contents
    drawn by their loss (loss_weight_cap) included."""
    folder, _ = quick_run
    shuffled = copy.copy(dataset)
    shuffled.train = copy.copy(dataset.train)
    shuffled.train.bias = dataset.train.bias[torch.randperm(len(dataset.train.bias), generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(shuffled.train.bias, dataset.train.bias)
    every = list(REGISTRY)
    cfg = make_config("quick", {"methods": every, "diffusion": {"hard_share": 0.5}, "mining": {"loss_weight_cap": 50.0}})
    runs = {}
    for name, data in (("true", dataset), ("shuffled", shuffled)):
        runs[name] = tmp_path / name
        Run(runs[name], cfg, progress=False, dataset=data).all()
    one, other = runs["true"], runs["shuffled"]
    mined = lambda d: json.loads((d / "biased/mining.json").read_text())["indices"]  # noqa: E731
    assert mined(one) == mined(other) == mined(folder)
    drawn = lambda d: json.loads((d / "biased/mining.json").read_text())["weights"]  # noqa: E731
    assert drawn(one) == drawn(other) and drawn(folder) is None and len(set(drawn(one))) > 1
    weights = lambda d: (d / "unet/diffusion_pytorch_model.safetensors").read_bytes()  # noqa: E731
    assert weights(one) == weights(other)
    assert weights(one) != weights(folder)  # the weighting changes what the U-Net learns
    # train.json says which biased model drew the hard half (the quick preset's: "auto", the MLP at 28 px)
    assert json.loads((one / "unet/train.json").read_text())["data"]["hard_by"] == "mlp"
    a = torch.load(one / "synthetic/samples.pt", weights_only=True)
    b = torch.load(other / "synthetic/samples.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in every:
        sa = torch.load(one / f"classifiers/{name}.pt", weights_only=True)
        sb = torch.load(other / f"classifiers/{name}.pt", weights_only=True)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_hard_share_oversamples_the_hard_samples():
    """A batch's hard share is drawn by weight: samples of weight 0 never appear in it, the uniform share covers all."""
    from diffinject.core.diffusion import DiffusionConfig, draw_batch

    weights = torch.zeros(100)
    weights[:5] = 1.0
    g = torch.Generator().manual_seed(0)
    cfg = DiffusionConfig(batch_size=40, hard_share=0.5)
    batches = torch.stack([draw_batch(100, cfg, g, weights) for _ in range(50)])
    assert (batches[:, 20:] < 5).all()  # the weighted half: only the five hard samples
    assert (batches[:, :20] >= 5).float().mean() > 0.8  # the uniform half: mostly the others
    with pytest.raises(ValueError, match="one non-negative sample weight per image"):
        from diffinject.core.diffusion import train_diffusion

        train_diffusion(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), cfg, "/nonexistent-never-created", progress=False)


def test_a_finished_classifier_is_never_read_back_under_other_hyperparameters(quick_run, dataset, tmp_path):
    """A classifier record made before a hyperparameter existed reads at its old value; one trained with another
    value than today's (a default changed since) is refused, naming it, not reported under the new settings."""
    import shutil

    from diffinject.core.artifacts import seal

    folder, metrics = quick_run
    copy_dir = tmp_path / "copy"
    shutil.copytree(folder, copy_dir)
    record = copy_dir / "classifiers" / "lff.json"
    old = json.loads(record.read_text())
    old["params"] = {"ema_alpha": old["params"]["ema_alpha"]}  # before cap_extra_weight and biased_learns_extra
    files = ["classifiers/lff.pt", "classifiers/lff.json"]
    record.write_text(json.dumps(old))
    seal(copy_dir, "classifier-lff", files)  # as that version sealed it (an unsealed edit would be redone)
    run = Run(copy_dir, make_config("quick"), progress=False, dataset=dataset)
    assert run.method("lff")["unbiased"] == metrics["methods"]["lff"]["unbiased"]
    assert run.repairs == []
    record.write_text(json.dumps({**old, "params": {**old["params"], "cap_extra_weight": True}}))
    seal(copy_dir, "classifier-lff", files)
    with pytest.raises(ValueError, match=r"lff in .* was trained with other hyperparameters \(cap_extra_weight\)"):
        run.method("lff")


def test_a_shipped_unet_is_named_one_way_at_any_ratio(dataset, tmp_path):
    """The shipped 1 % U-Net reads the same in the tables whether a 1 % run finds it or --unet names it at 5 %."""
    from diffinject.core.run import PRETRAINED

    found = Run(tmp_path / "found", make_config("quick", {"unet": "shipped"}), progress=False, dataset=dataset)
    named = Run(tmp_path / "named", make_config("quick", {"ratio": 5.0, "unet": str(PRETRAINED / "cmnist-1pct")}),
                progress=False, dataset=dataset)
    assert found.unet_origin("diffinject") == named.unet_origin("diffinject") == "core/pretrained/cmnist-1pct (shipped)"


def test_corpus_row_says_it_uses_bias_knowledge(quick_run, dataset, tmp_path):
    """diffinject-corpus makes its own row from the corpus U-Net beside the label-free one, on the same pairs."""
    folder, _ = quick_run
    cfg = make_config("quick", {"methods": ["diffinject", "diffinject-corpus"], "unet": str(folder / "unet")})
    metrics = Run(tmp_path / "both", cfg, progress=False, dataset=dataset).all()
    assert set(metrics["methods"]) == set(metrics["injection"]) == {"diffinject", "diffinject-corpus"}
    src = metrics["unet_sources"]
    assert src["diffinject-corpus"]["bias_knowledge"] is True and "corpus" in src["diffinject-corpus"]["origin"]
    assert src["diffinject"]["bias_knowledge"] is False
    assert src["diffinject"]["origin"] == f"trained on the training split by run {folder.parent.name}/{folder.name}"
    a = torch.load(tmp_path / "both/synthetic/samples.pt", weights_only=True)
    b = torch.load(tmp_path / "both/synthetic-corpus/samples.pt", weights_only=True)
    assert torch.equal(a["content"], b["content"]) and torch.equal(a["style"], b["style"])
    assert not torch.equal(a["images"], b["images"])
    report = (tmp_path / "both/report.md").read_text()
    assert "| DiffInject, corpus U-Net (uses bias knowledge) |" in report and "built with knowledge of the bias" in report


def test_corpus_row_needs_the_embedded_cmnist(capsys, tmp_path):
    code = main(["run", "--preset", "quick", "--dataset", "corrupted_mnist", "--methods", "diffinject-corpus",
                 "--out", str(tmp_path / "r"), "--no-progress"])
    assert code == 2 and "diffinject-corpus needs the embedded cmnist" in capsys.readouterr().err


def test_defaults_come_from_one_registry(monkeypatch):
    """The default preset is the dataclasses' defaults; a dataset's entry applies with any preset and data_root, and
    a preset's own values and the user's settings win over it; the default rows are the label-free ones on every dataset."""
    from diffinject.core import config
    from diffinject.core.config import DATASET_DEFAULTS, DEFAULT_METHODS, PRESETS, RunConfig, merge, run_methods

    assert PRESETS["default"] == {}
    assert make_config().to_dict() == merge(RunConfig().to_dict(), DATASET_DEFAULTS["cmnist"])
    assert make_config(overrides={"dataset": "bffhq", "data_root": "/data"}).mining.k == RunConfig().mining.k == 10
    for over in ({}, {"ratio": 0.5}, {"dataset": "corrupted_mnist"}, {"data_root": "/data"}):
        assert run_methods(make_config(overrides=over)) == DEFAULT_METHODS
    assert "diffinject" in DEFAULT_METHODS and "diffinject-corpus" not in DEFAULT_METHODS
    on_folder = make_config("table", {"data_root": "/data"})  # the dataset's entry, under another preset
    assert (on_folder.mining.classifier.arch, on_folder.mining.min_loss, on_folder.mining.k) == ("cnn", 4.0, 5)
    paper = make_config("paper", {"data_root": "/data"}).mining  # a preset's own values win over the entry
    assert (paper.classifier.arch, paper.min_loss, paper.k) == ("auto", 0.0, 10)
    assert make_config(overrides={"mining": {"k": 7}}).mining.k == 7
    corrupted = make_config(overrides={"dataset": "corrupted_mnist", "injection": {"skip_levels": 0}})
    assert corrupted.injection.skip_levels == 0 and corrupted.hparams["lff"] == {"biased_arch": "cnn"}
    # a U-Net the run trains draws half of each batch by difficulty; the quick preset keeps uniform batches
    assert make_config().diffusion.hard_share == 0.5 and make_config("quick").diffusion.hard_share == 0.0
    assert make_config().injection.precision == "auto"
    # the everyday number of synthetic samples is one value; the table preset is the published tables' 1.0
    assert make_config().injection.synthetic_ratio == config.EVERYDAY_SYNTHETIC_RATIO
    assert make_config("table").injection.synthetic_ratio == 1.0
    monkeypatch.setattr(config, "EVERYDAY_SYNTHETIC_RATIO", 0.5)
    assert make_config().injection.synthetic_ratio == 0.5
    with pytest.raises(ValueError, match="unknown preset 'fast'; presets are default, table, quick, paper"):
        make_config("fast")


def test_time_budget_stops_the_run_and_a_rerun_finishes_it(quick_run, capsys, tmp_path):
    """--max-minutes stops the U-Net stage with exit 3 and its progress saved; the same command again resumes and
    ends with the U-Net an uninterrupted run trains."""
    folder, _ = quick_run
    argv = ["run", "--preset", "quick", "--methods", "diffinject", "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(argv + ["--max-minutes", "0.00001"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("diffinject: stopped: the U-Net stopped at its time budget") and err.count("\n") == 1
    assert json.loads((tmp_path / "r/unet/train.json").read_text())["steps"] < 30
    assert not (tmp_path / "r/synthetic").exists()
    assert main(argv) == 0
    assert (tmp_path / "r/unet/diffusion_pytorch_model.safetensors").read_bytes() == \
        (folder / "unet/diffusion_pytorch_model.safetensors").read_bytes()


def test_quick_run_on_corrupted_mnist(tmp_path):
    """The second embedded benchmark end to end: its readers give the injection report, the oracle redraws real
    digits with another class's corruption."""
    metrics = Run(tmp_path / "c", make_config("quick", {"dataset": "corrupted_mnist"}), progress=False).all()
    assert set(metrics["methods"]) == {"vanilla", "lff", "diffinject", "oracle"}
    assert metrics["dataset"]["name"] == "corrupted_mnist"
    rep = metrics["injection"]["diffinject"]["report"]
    assert rep["bias_attribute"] == "corruption" and rep["colour_reader_test_accuracy"] > 95
    assert metrics["methods"]["vanilla"]["aligned"] > metrics["methods"]["vanilla"]["conflicting"] + 20
    assert metrics["unet_sources"]["diffinject"]["data"]["dataset"] == "corrupted_mnist"


def test_folder_from_before_a_new_setting_still_resumes(quick_run, dataset):
    folder, _ = quick_run
    saved = (folder / "config.json").read_text()
    old = json.loads(saved)
    del old["injection"]["label_from"]  # as if written before this setting existed (it is at its default)
    (folder / "config.json").write_text(json.dumps(old))
    try:
        Run(folder, make_config("quick"), progress=False, dataset=dataset)  # no refusal
        with pytest.raises(ValueError, match="another config.*injection.label_from"):
            Run(folder, make_config("quick", {"injection": {"label_from": "style"}}), progress=False, dataset=dataset)
    finally:
        (folder / "config.json").write_text(saved)


def test_folder_from_before_misclassified_only_reads_as_plain_top_k(quick_run, dataset):
    """Folders mined before the setting existed kept all K: resuming them under the new default is refused."""
    folder, _ = quick_run
    saved = (folder / "config.json").read_text()
    old = json.loads(saved)
    del old["mining"]["misclassified_only"]
    (folder / "config.json").write_text(json.dumps(old))
    try:
        with pytest.raises(ValueError, match="another config.*mining.misclassified_only"):
            Run(folder, make_config("quick"), progress=False, dataset=dataset)
        Run(folder, make_config("quick", {"mining": {"misclassified_only": False}}), progress=False, dataset=dataset)
    finally:
        (folder / "config.json").write_text(saved)


def test_other_config_on_a_finished_folder_is_refused(quick_run, dataset):
    folder, _ = quick_run
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="another config.*injection.gamma"):
        Run(folder, make_config("quick", {"injection": {"gamma": 0.3}}), progress=False, dataset=dataset)
    assert before == {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv, words", [
    (["--ratio", "3"], "ratio 3 is not one of"),
    (["--dataset", "imagenet"], "needs --data-root"),
    (["--dataset", "bffhq", "--data-root", "/nonexistent"], "missing folder"),
    (["--k", "100000"], "K=100000 is out of range"),
    (["--k", "0"], "--k 0 is outside [1, "),
    (["--gamma", "1.5"], "gamma 1.5 is outside [0, 1]"),
    (["--synthetic-ratio", "0"], "synthetic-ratio 0.0 must be in (0, 10]"),
    (["--methods", "vanilla,magic"], "unknown method 'magic'"),
    (["--hard-share", "1.5"], "--hard-share 1.5 must be in [0, 1]"),
    (["--loss-weight-cap", "-1"], "error: --loss-weight-cap must be >= 0"),
])
def test_cli_bad_input_one_line_error(argv, words, capsys, tmp_path):
    code = main(["run", "--preset", "quick", "--out", str(tmp_path / "r"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and err.startswith("diffinject: error:") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing written for a refused run


def test_cli_refuses_a_folder_of_another_config(quick_run, capsys):
    folder, _ = quick_run
    code = main(["run", "--preset", "quick", "--out", str(folder), "--gamma", "0.3", "--no-progress"])
    assert code == 2 and "was made by another config" in capsys.readouterr().err


def test_a_finished_run_reports_what_its_stages_took_not_the_read_back(quick_run, dataset):
    """metrics.json's stage_seconds come from the artifacts, so a table re-rendered from finished runs still says
    what they cost."""
    folder, metrics = quick_run
    again = Run(folder, make_config("quick"), progress=False, dataset=dataset).all()
    assert again["stage_seconds"] == metrics["stage_seconds"]
    assert {"biased", "synthetic:diffinject", *metrics["methods"]} <= set(metrics["stage_seconds"])
    assert all(v is not None for v in metrics["stage_seconds"].values())
    assert again["seconds_this_invocation"] < sum(metrics["stage_seconds"].values())


def test_a_finished_folder_takes_other_methods_and_reuses_its_stages(quick_run, dataset, tmp_path):
    """Another method list or hyperparameters train only the classifiers they add, on the same mined pairs and
    synthetic samples; a classifier already there is refused under other hyperparameters, never retrained over."""
    import shutil

    from diffinject.core.artifacts import seal

    folder, metrics = quick_run
    copy_dir = tmp_path / "copy"
    shutil.copytree(folder, copy_dir)
    stages = {p: p.stat().st_mtime_ns for p in (copy_dir / "biased").rglob("*") if p.is_file()}
    stages.update({p: p.stat().st_mtime_ns for p in (copy_dir / "synthetic").rglob("*") if p.is_file()})
    cfg = make_config("quick", {"methods": ["vanilla", "disent+diffinject"],
                                "hparams": {"disent+diffinject": {"cap_extra_weight": True}}})
    again = Run(copy_dir, cfg, progress=False, dataset=dataset).all()
    assert list(again["methods"]) == ["vanilla", "disent+diffinject"]
    assert again["methods"]["vanilla"] == metrics["methods"]["vanilla"]  # read back, not retrained
    assert all(p.stat().st_mtime_ns == t for p, t in stages.items())  # mining and generation reused as they were
    assert json.loads((copy_dir / "config.json").read_text())["methods"] == ["vanilla", "disent+diffinject"]
    changed = make_config("quick", {"methods": ["disent+diffinject"]})  # uncapped now: that classifier is capped
    with pytest.raises(ValueError, match=r"disent\+diffinject in .* was trained with other hyperparameters"):
        Run(copy_dir, changed, progress=False, dataset=dataset).all()


def test_diffusion_settings_bind_a_folder_only_where_it_trains_its_unet(quick_run, dataset, tmp_path):
    """A folder whose U-Net came from elsewhere resumes under other diffusion settings (they decide nothing there),
    so a changed default never locks users out of such runs; any other difference is still refused."""
    folder, _ = quick_run
    given = {"methods": ["vanilla", "diffinject"], "unet": str(folder / "unet")}
    Run(tmp_path / "given", make_config("quick", given), progress=False, dataset=dataset)
    Run(tmp_path / "given", make_config("quick", given | {"diffusion": {"hard_share": 0.5}}), progress=False,
        dataset=dataset)
    with pytest.raises(ValueError, match=r"differs in injection\.gamma"):
        Run(tmp_path / "given", make_config("quick", given | {"injection": {"gamma": 0.3}}), progress=False,
            dataset=dataset)
    with pytest.raises(ValueError, match=r"differs in diffusion\.hard_share"):  # this folder trained its own
        Run(folder, make_config("quick", {"diffusion": {"hard_share": 0.5}}), progress=False, dataset=dataset)


def test_cli_bad_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("injection: {gamma: [unclosed\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    bad.write_text("injection: {gama: 0.5}\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "unknown config key 'injection.gama'" in capsys.readouterr().err
    for text, words in (("hparams: 5\n", "bad.yaml: hparams must be a mapping, not 5"),
                        ("hparams: {jtt: {lamda_up: 5}}\n", "unknown hyperparameter(s) lamda_up for method 'jtt'"),
                        ("hparams: {magic: {}}\n", "unknown method 'magic'")):
        bad.write_text(text)
        assert main(["run", "--preset", "quick", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
        assert words in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffinject.workers.cli", "run", "--ratio", "7", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "ratio 7 is not one of" in proc.stderr


def test_quick_run_on_released_folder_layout(dataset, tmp_path):
    """A user with the released folders runs the same pipeline with --data-root (here: a small cmnist copy)."""
    root = tmp_path / "data"

    def write(split, folder, by_label=True):
        for i in range(len(split)):
            label, bias = int(split.labels[i]), int(split.bias[i])
            sub = folder / str(label) if by_label else folder
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).save(sub / f"{i}_{label}_{bias}.png")

    tr = dataset.train
    aligned = (tr.labels == tr.bias).nonzero().flatten()[:290]
    conflict = (tr.labels != tr.bias).nonzero().flatten()[:10]
    write(tr.subset(aligned), root / "cmnist/1pct/align")
    write(tr.subset(conflict), root / "cmnist/1pct/conflict")
    write(dataset.valid.subset(range(60)), root / "cmnist/1pct/valid", by_label=False)
    write(dataset.test.subset(range(100)), root / "cmnist/test")
    out = tmp_path / "run"
    code = main(["run", "--preset", "quick", "--data-root", str(root), "--out", str(out), "--no-progress",
                 "--methods", "vanilla,diffinject,oracle"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["train"] == 300 and metrics["dataset"]["test"] == 100
    assert set(metrics["methods"]) == {"vanilla", "diffinject"}  # no oracle without the grey digits
    inj = metrics["injection"]["diffinject"]
    assert "report" not in inj  # the readers need the embedded data; the label-free signal stays
    assert 0 <= inj["biased_model_wrong"] <= 100


def test_table_rows_carry_their_unet_source(quick_run):
    """The debias table keeps table[pct][method][metric] = {mean, std} and names each synthetic row's U-Net."""
    import types

    from benchmarks.debias_table import render, summarise

    _, metrics = quick_run
    other = copy.deepcopy(metrics)
    other["methods"]["diffinject"]["unbiased"] += 2.0
    table, sources = summarise({(1.0, 0): metrics, (1.0, 1): other}, [1.0], [0, 1])
    cell = table["1pct"]
    assert set(cell) >= {"vanilla", "lff", "diffinject", "oracle", "injection_report", "biased_model_wrong"}
    assert cell["diffinject"]["unbiased"]["mean"] == round(metrics["methods"]["diffinject"]["unbiased"] + 1.0, 2)
    assert cell["diffinject"]["unbiased"]["std"] == 1.41
    assert set(cell["injection_report"]) == {"diffinject"}
    assert sources == {"diffinject": {"1pct": metrics["unet_sources"]["diffinject"]}}
    md = render(table, types.SimpleNamespace(seeds=[0, 1]),
                {"unet_sources": sources, "command": "x", "machine": "y", "torch": "z", "wall_seconds": 60})
    assert "DiffInject (label-free): U-Net trained in this run on the training split; no knowledge of the bias." in md


def test_table_reuses_rows_it_does_not_make_and_says_so(quick_run):
    """--reuse copies an earlier file's rows (and their extras and U-Net) for the methods this run lacks, never over
    a row it made, and names the file and command; a row measured at fewer ratios renders '-' elsewhere."""
    import types

    from benchmarks.debias_table import render, reuse_rows, summarise

    _, metrics = quick_run
    old_table, old_sources = summarise({(1.0, 0): metrics}, [1.0], [0])
    old = {"meta": {"command": "python old", "unet_sources": old_sources}, "table": old_table}
    peers = copy.deepcopy(metrics)
    peers["methods"] = {"vanilla": {k: v + 1 for k, v in metrics["methods"]["vanilla"].items() if k != "params"}}
    peers["injection"], peers["unet_sources"] = {}, {}
    peers["mining"] = {**metrics["mining"], "precision": (metrics["mining"]["precision"] or 0) + 7}
    table, sources = summarise({(1.0, 0): peers, (5.0, 0): peers}, [1.0, 5.0], [0])
    meta = {"unet_sources": sources, "command": "python new", "machine": "y", "torch": "z", "wall_seconds": 60}
    reuse_rows(table, meta, old, "old.json")
    # a run without synthetic rows does not score the mined set: the synthetic rows' own mining precision stays
    assert table["1pct"]["mining_precision"] == old_table["1pct"]["mining_precision"]
    assert table["1pct"]["vanilla"]["unbiased"]["mean"] == metrics["methods"]["vanilla"]["unbiased"] + 1  # kept
    assert table["1pct"]["diffinject"] == old_table["1pct"]["diffinject"] and "diffinject" not in table["5pct"]
    assert table["1pct"]["injection_report"]["diffinject"] == old_table["1pct"]["injection_report"]["diffinject"]
    assert meta["reused"]["diffinject"] == [{"from": "old.json", "command": "python old", "ratios": ["1pct"]}]
    assert meta["unet_sources"]["diffinject"] == old_sources["diffinject"]
    md = render(table, types.SimpleNamespace(seeds=[0]), meta)
    row = next(line for line in md.splitlines() if line.startswith("| DiffInject (label-free) |"))
    assert row.endswith("| - |") and "rows at 1pct copied from `old.json`, measured by `python old`" in md

    # a ratio this run did not make comes whole, in ratio order, and a row the old file had reused keeps its origin
    old["table"]["0.5pct"] = copy.deepcopy(old_table["1pct"])
    old["meta"]["reused"] = {"vanilla": {"from": "older.json", "command": "python older"}}
    table, _ = summarise({(5.0, 0): peers}, [5.0], [0])
    meta = {"unet_sources": {}, "command": "python new"}
    reuse_rows(table, meta, old, "old.json")
    assert list(table) == ["0.5pct", "1pct", "5pct"] and table["0.5pct"] == old["table"]["0.5pct"]
    assert meta["reused"]["vanilla"] == [{"from": "older.json", "command": "python older",
                                          "ratios": ["1pct", "0.5pct"]}]

    # a row whose ratios two commands measured names each command with its own ratios
    other = {"meta": {"command": "python another", "unet_sources": {}},
             "table": {"2pct": copy.deepcopy(old_table["1pct"])}}
    reuse_rows(table, meta, other, "another.json")
    assert meta["reused"]["diffinject"] == [
        {"from": "old.json", "command": "python old", "ratios": ["1pct", "0.5pct"]},
        {"from": "another.json", "command": "python another", "ratios": ["2pct"]}]
    md = render(table, types.SimpleNamespace(seeds=[0]), {**meta, "machine": "y", "torch": "z", "wall_seconds": 60})
    assert "rows at 2pct copied from `another.json`, measured by `python another`" in md


def test_table_keeps_each_rows_own_unet_when_rows_of_one_source_differ(quick_run):
    """A fold that remakes some rows of a synthetic source with a new U-Net names that U-Net for them and keeps the
    old one for the rows it copies (files from before keyed their U-Nets by source): neither renames the other."""
    import types

    from benchmarks.debias_table import render, reuse_rows, summarise

    _, metrics = quick_run
    new = copy.deepcopy(metrics)
    new["methods"] = {"diffinject": metrics["methods"]["diffinject"]}
    new["unet_sources"] = {"diffinject": dict(metrics["unet_sources"]["diffinject"], origin="the new U-Net")}
    table, sources = summarise({(1.0, 0): new}, [1.0], [0])
    old_table, _ = summarise({(1.0, 0): metrics}, [1.0], [0])
    old_table["1pct"]["jtt+diffinject"] = old_table["1pct"]["diffinject"]
    old_unet = dict(metrics["unet_sources"]["diffinject"], origin="the old U-Net")
    old = {"meta": {"command": "python old", "unet_sources": {"diffinject": {"1pct": old_unet}}}, "table": old_table}
    meta = {"unet_sources": sources, "command": "python new", "machine": "y", "torch": "z", "wall_seconds": 60}
    reuse_rows(table, meta, old, "old.json")
    assert meta["unet_sources"]["diffinject"]["1pct"]["origin"] == "the new U-Net"
    assert meta["unet_sources"]["jtt+diffinject"]["1pct"]["origin"] == "the old U-Net"
    lines = render(table, types.SimpleNamespace(seeds=[0]), meta).splitlines()
    assert any(line.startswith("DiffInject (label-free): U-Net the new U-Net;") for line in lines)
    assert any(line.startswith("JTT + DiffInject (label-free): U-Net the old U-Net;") for line in lines)


def test_table_says_when_a_row_used_another_ratios_unet():
    """A label-free row whose U-Net learnt from another ratio's training split says so, ratio by ratio."""
    from benchmarks.debias_table import unet_line

    src = {"origin": "core/pretrained/cmnist-1pct", "data": {"dataset": "cmnist", "ratio": "1pct"},
           "bias_knowledge": False}
    assert unet_line({"1pct": src}) == "core/pretrained/cmnist-1pct; no knowledge of the bias"
    assert unet_line({"1pct": src, "5pct": [src, src]}) == \
        "core/pretrained/cmnist-1pct; at 5pct the 1pct split's U-Net; no knowledge of the bias"
    own = {"origin": "trained in this run", "data": {"dataset": "cmnist", "ratio": "5pct"}, "bias_knowledge": False}
    assert unet_line({"1pct": src, "2pct": src, "5pct": [own, dict(own, origin="trained by run seed0")]}) == \
        "core/pretrained/cmnist-1pct at 1pct, 2pct; trained in this run / trained by run seed0 at 5pct; " \
        "at 2pct the 1pct split's U-Net; no knowledge of the bias"


def test_help_reads_its_defaults_from_the_registry(monkeypatch):
    """Each run flag's help shows the config registry's default, and a dataset's own where its entry differs; every
    command's help ends with an example."""
    from diffinject.core import config
    from diffinject.workers.cli import build_parser

    def run_help() -> str:
        return " ".join(build_parser().commands.choices["run"].format_help().split())

    assert f"synthetic samples per training image (default: {config.EVERYDAY_SYNTHETIC_RATIO:g})" in run_help()
    assert "(default: 0; corrupted_mnist: 1)" in run_help()  # --skip-levels
    monkeypatch.setattr(config, "EVERYDAY_SYNTHETIC_RATIO", 0.55)
    assert "synthetic samples per training image (default: 0.55)" in run_help()
    for name, command in build_parser().commands.choices.items():
        assert f"example: diffinject {name}" in " ".join(command.format_help().split())


def test_a_folder_with_a_retired_setting_is_refused_in_one_line(tmp_path):
    """A run folder whose config.json holds a setting this version no longer has is refused, naming the setting,
    instead of failing inside the dataclass."""
    import json

    from diffinject.core.config import RunConfig
    from diffinject.core.run import saved_config

    cfg = RunConfig().to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert saved_config(tmp_path) == RunConfig()  # a current folder reads back as it was written
    cfg["injection"]["keep_fraction"] = 1.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"another version of diffinject .*'injection\.keep_fraction'"):
        saved_config(tmp_path)
