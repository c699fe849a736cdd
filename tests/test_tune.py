"""``diffinject tune``: a two-trial sweep on a local Ray cluster, its outputs and choice; bad grids."""

import csv
import json

import pytest

from diffinject.workers.cli import main
from diffinject.workers.tune import GRACE_PERIOD

GAMMAS = (0.3, 0.7)


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    """Quick preset on the shipped label-free U-Net of cmnist 1 % (nothing to train but the biased MLP): K from the flag, gamma and the
    U-Net from the grid file. The trials train LfF on real + synthetic: a registered method reaches Tune by name."""
    folder = tmp_path_factory.mktemp("tune")
    grid = folder / "grid.yaml"
    grid.write_text(f"k: [99]\ngamma: {list(GAMMAS)}\nconfig:\n  unet: shipped\n")
    out = folder / "sweep"
    code = main(["tune", "--preset", "quick", "--method", "lff+diffinject", "--grid", str(grid), "--k", "3", "--epochs", "3", "--num-samples", "8",
                 "--cpus-per-trial", "1", "--threads", "1", "--no-progress", "--out", str(out)])
    return code, out


def test_sweep_writes_one_row_per_trial(sweep):
    code, out = sweep
    assert code == 0
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["k"]), float(r["gamma"])) for r in rows] == [(3, g) for g in GAMMAS]
    for r in rows:
        assert not r["error"] and 0 <= float(r["valid_accuracy"]) <= 100
        epochs = int(r["epochs"])
        assert GRACE_PERIOD <= epochs <= 3  # ASHA stops a trial only after its grace period
        assert r["stopped_early"] == str(epochs < 3)
    assert max(int(r["epochs"]) for r in rows) == 3  # the best trial runs to the end
    assert sum(line.startswith("| 3 |") for line in (out / "trials.md").read_text().splitlines()) == 2
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the base folder holds the shared models; trials mine and inject in memory, never into it
    base = out / "base"
    assert (base / "biased" / "model.pt").exists() and (base / "unet" / "train.json").exists()
    assert not (base / "biased" / "mining.json").exists() and not (base / "synthetic").exists()


def test_sweep_chooses_best_valid_accuracy_and_reports_test_metrics(sweep):
    _, out = sweep
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    best = json.loads((out / "best.json").read_text())
    top = max(rows, key=lambda r: float(r["valid_accuracy"]))
    assert (best["k"], best["gamma"]) == (int(top["k"]), float(top["gamma"]))
    assert best["valid_accuracy"] == float(top["valid_accuracy"])
    assert set(best["test"]) == {"unbiased", "aligned", "conflicting", "worst_group"} and best["method"] == "lff+diffinject"
    assert all(0 <= v <= 100 for v in best["test"].values())


@pytest.mark.parametrize("flags, message", [
    (["--k", "3", "--gamma", "1.5"], "gamma 1.5 is outside [0, 1]"),
    (["--k", "", "--gamma", "0.5"], "empty grid: no k values"),
    (["--k", "0", "--gamma", "0.5"], "K 0 is invalid"),
    (["--k", "3,x", "--gamma", "0.5"], "--k '3,x' must be a comma list of integers"),
    (["--method", "jtt"], "--method 'jtt' does not learn from the label-free synthetic samples"),
    (["--method", "magic"], "unknown method 'magic'"),
])
def test_bad_grid_exits_2_with_one_line(tmp_path, capsys, flags, message):
    assert main(["tune", "--preset", "quick", "--out", str(tmp_path / "sweep"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()  # refused before anything was written


def test_bad_grid_file_exits_2(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("k: []\ngamma: [0.5]\n")
    assert main(["tune", "--grid", str(grid), "--out", str(tmp_path / "sweep")]) == 2
    assert "empty grid: no k values" in capsys.readouterr().err
    grid.write_text("k: [3]\ngamma: [0.5]\nbeta: 1\n")
    assert main(["tune", "--grid", str(grid), "--out", str(tmp_path / "sweep")]) == 2
    assert "unknown key 'beta'" in capsys.readouterr().err
