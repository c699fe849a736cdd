"""A results table's cells as Ray tasks (workers.table): two cells run side by side, a cell whose worker is killed
midway is retried and resumes from its run folder, and every cell's results equal the same run in this process."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from diffinject.workers.table import run_cell, run_cells

# a Colored MNIST run of a few seconds: few epochs, a tiny U-Net that checkpoints halfway
SMALL = {"methods": ["vanilla", "diffinject"], "mining": {"k": 2, "classifier": {"epochs": 2}},
         "diffusion": {"steps": 8, "checkpoint_every": 4}, "injection": {"num_samples": 8, "batch_size": 4},
         "classifier": {"epochs": 2}}


def job(folder, ratio: float) -> tuple:
    return str(folder), "quick", {**SMALL, "ratio": ratio, "seed": 0}


def results(metrics: dict) -> dict:
    """What a cell reports, less what depends on the clock."""
    return {"methods": metrics["methods"], "mining": metrics["mining"]}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, cmnist):
    """The reference: each cell run here, in this process."""
    root = tmp_path_factory.mktemp("in-process")
    return {ratio: results(run_cell(*job(root / f"{ratio:g}", ratio))) for ratio in (1.0, 2.0)}


def test_two_cells_run_side_by_side_and_equal_the_in_process_runs(ray_cluster, in_process, tmp_path, capsys):
    jobs = [job(tmp_path / f"{ratio:g}", ratio) for ratio in (1.0, 2.0)]
    got = run_cells(run_cell, jobs, cpus=1, cells=2, describe=lambda j: os.path.basename(j[0]))
    assert [results(m) for m in got] == [in_process[1.0], in_process[2.0]]
    spans = [((tmp_path / n / "config.json").stat().st_mtime, (tmp_path / n / "metrics.json").stat().st_mtime)
             for n in ("1", "2")]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], f"the cells ran one after the other: {spans}"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cell ")]
    assert len(lines) == 2 and all(": done (" in line for line in lines)
    # a finished cell is read back, not run again: its folder's files stay as they were
    before = (tmp_path / "1" / "metrics.json").stat().st_mtime_ns, (tmp_path / "1" / "biased" / "model.pt").read_bytes()
    again = run_cells(run_cell, jobs[:1], cpus=1, progress=False)
    assert results(again[0]) == in_process[1.0]
    assert (tmp_path / "1" / "biased" / "model.pt").read_bytes() == before[1]


def test_a_cell_whose_worker_is_killed_midway_reruns_and_resumes(ray_cluster, in_process, tmp_path):
    folder = tmp_path / "killed"
    killed = {}

    def kill_when_the_unet_is_halfway():
        checkpoint = folder / "unet" / "checkpoint.pt"
        deadline = time.time() + 300
        while not checkpoint.exists() and time.time() < deadline:
            time.sleep(0.02)
        killed["pid"] = int((folder / ".lock").read_text())
        os.kill(killed["pid"], signal.SIGKILL)

    watcher = threading.Thread(target=kill_when_the_unet_is_halfway, daemon=True)
    watcher.start()
    [metrics] = run_cells(run_cell, [job(folder, 1.0)], cpus=1, progress=False)
    watcher.join(timeout=5)
    assert "pid" in killed, "the cell finished before its worker could be killed"
    assert int((folder / ".lock").read_text()) != killed["pid"]  # another worker took the folder over
    assert not (folder / "manifests" / "unet.json").exists() or json.loads(
        (folder / "unet" / "train.json").read_text())["steps"] == SMALL["diffusion"]["steps"]
    assert results(metrics) == in_process[1.0]


def test_a_failing_cell_is_named_in_its_line_and_raised_once_the_others_finish(ray_cluster, tmp_path, capsys):
    jobs = [(str(tmp_path / "bad"), "no-such-preset", {}), (str(tmp_path / "bad-too"), "quick", {"seed": -1})]
    with pytest.raises(ValueError, match="unknown preset 'no-such-preset'"):
        run_cells(run_cell, jobs, cpus=1, cells=2, describe=lambda j: os.path.basename(j[0]))
    lines = sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("cell "))
    assert len(lines) == 2 and all(": failed: " in line for line in lines)
