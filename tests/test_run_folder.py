"""The run folder keeps its promises under faults: one writer, every file whole or absent, every stage sealed by a
manifest and checked when read, every error one line (exit 2 for input, 1 for the environment, 130 for Ctrl-C), and
bad settings refused before the folder is touched. Each rerun after a fault must equal an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffinject.workers.cli import build_parser, explain, main

REPO = Path(__file__).resolve().parent.parent

# A quick run made smaller: every stage, a few seconds in all
SMALL = """\
methods: [vanilla, diffinject]
mining: {classifier: {epochs: 2}}
diffusion: {steps: 12, checkpoint_every: 4}
injection: {num_samples: 8, batch_size: 4}
classifier: {epochs: 2}
"""
STAGES = ("biased", "mining", "unet", "synthetic", "classifier-vanilla", "classifier-diffinject")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(SMALL)
    return path


def _argv(config, out, *more):
    return ["run", "--preset", "quick", "--config", str(config), "--out", str(out), "--no-progress", "--threads", "1",
            *more]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "diffinject.workers.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _code(argv) -> int:
    """``main(argv)``'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """An uninterrupted run of the small config."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_argv(config, out)) == 0
    return out


def _untimed(obj):
    """``obj`` without its timing entries (any key naming seconds) and the repairs it reports."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if "second" not in k and k != "repairs"}
    return obj


def assert_same_run(a: Path, b: Path) -> None:
    """Every file of run ``a`` is in ``b`` with the same content: tensors equal, JSON equal timing aside, any other
    file byte for byte. Manifests list the same files (their digests differ where a JSON's timing does)."""
    skip = {".lock", "report.md"}
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name not in skip)
    for rel in files:
        x, y = a / rel, b / rel
        if rel.startswith("manifests/"):
            assert json.loads(x.read_text())["files"].keys() == json.loads(y.read_text())["files"].keys(), rel
        elif rel.endswith(".json"):
            assert _untimed(json.loads(x.read_text())) == _untimed(json.loads(y.read_text())), rel
        elif rel.endswith(".pt"):
            s, t = torch.load(x, weights_only=False), torch.load(y, weights_only=False)
            if rel.endswith("checkpoint.pt"):  # the U-Net's: its weights, not its wall-clock seconds
                s, t = {k: s[k] for k in ("unet", "ema", "step")}, {k: t[k] for k in ("unet", "ema", "step")}
            assert repr(s) == repr(t), rel
        else:
            assert x.read_bytes() == y.read_bytes(), rel


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# 1. one writer
# ---------------------------------------------------------------------------------------------------------


def test_two_runs_started_together_one_runs_the_other_is_refused(config, reference, tmp_path):
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "diffinject.workers.cli", *_argv(config, out)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [(p.pid, p.wait(timeout=600), p.stderr.read()) for p in procs]
    (winner, _, _), = [d for d in done if d[1] == 0]
    (_, code, err), = [d for d in done if d[1] != 0]
    assert code == 2
    line = _one_line(err)
    assert f"run folder {out.resolve()} is in use by another diffinject process (pid {winner})" in line
    assert_same_run(reference, out)


# ---------------------------------------------------------------------------------------------------------
# 2. whole or absent, checked on read
# ---------------------------------------------------------------------------------------------------------


def test_every_stage_is_sealed_by_a_manifest_of_its_files(reference):
    for stage in STAGES:
        listed = json.loads((reference / "manifests" / f"{stage}.json").read_text())["files"]
        for rel, entry in listed.items():
            assert entry["bytes"] == (reference / rel).stat().st_size
    unet = json.loads((reference / "manifests" / "unet.json").read_text())["files"]
    assert "unet/diffusion_pytorch_model.safetensors" in unet and "unet/checkpoint.pt" not in unet
    assert not list(reference.rglob("*.tmp")) and not list(reference.rglob("*.ckpt.pt"))


def _cut(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# each kind of file a run writes, cut in half (or its folder removed): the stage that wrote it
DAMAGE = {
    "biased/model.pt": "biased",
    "biased/mining.json": "mining",
    "biased/mined.png": "mining",
    "unet/diffusion_pytorch_model.safetensors": "unet",  # re-exported from unet/checkpoint.pt
    "unet/config.json": "unet",
    "synthetic/samples.pt": "synthetic",
    "synthetic/injection.json": "synthetic",
    "synthetic": "synthetic",  # the whole folder removed
    "classifiers/vanilla.pt": "classifier-vanilla",
    "classifiers/diffinject.json": "classifier-diffinject",
    "manifests/synthetic.json": "synthetic",  # the manifest itself
}


@pytest.mark.parametrize("damaged", list(DAMAGE))
def test_a_damaged_file_is_named_its_stage_redone_and_the_run_equals_an_uninterrupted_one(damaged, config, reference,
                                                                                          tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    target = out / damaged
    shutil.rmtree(target) if target.is_dir() else _cut(target)
    capsys.readouterr()
    assert main(_argv(config, out)) == 0
    err = capsys.readouterr().err
    stage = DAMAGE[damaged]
    named = [line for line in err.splitlines() if line.startswith(f"diffinject: {stage}: ")]
    assert len(named) == 1 and str(out) in named[0] and named[0].endswith("; redone"), err
    repairs = json.loads((out / "metrics.json").read_text())["repairs"]
    assert len(repairs) == 1 and repairs[0].startswith(f"{stage}: ")
    assert "## Redone on this invocation" in (out / "report.md").read_text()
    assert_same_run(reference, out)


def test_a_corrupt_config_or_samples_is_one_line_naming_it_and_nothing_changes(config, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    _cut(out / "config.json")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert main(_argv(config, out)) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"diffinject: error: {out / 'config.json'}: unreadable")
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}

    shutil.copy(reference / "config.json", out / "config.json")
    _cut(out / "synthetic" / "samples.pt")
    assert main(["export", str(out), "--to", str(tmp_path / "exported")]) == 1  # export reads; the run redoes
    line = _one_line(capsys.readouterr().err)
    assert str(out / "synthetic" / "samples.pt") in line and "rerun the run's command" in line
    assert not (tmp_path / "exported").exists()


# ---------------------------------------------------------------------------------------------------------
# 3. the environment: disk full, read-only, Ctrl-C
# ---------------------------------------------------------------------------------------------------------


def _namespace_mounts() -> str | None:
    """Why a private tmpfs cannot be mounted here (None when it can): the disk-full test needs one."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a mount namespace: {probe.stderr.strip()}"


@pytest.mark.skipif(_namespace_mounts() is not None, reason=str(_namespace_mounts()))
def test_a_disk_that_fills_mid_run_is_one_line_and_a_rerun_with_space_equals_an_uninterrupted_run(config, reference,
                                                                                                    tmp_path):
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    run = [sys.executable, "-m", "diffinject.workers.cli", *_argv(config, disk / "run")]
    command = " ".join(run)
    script = f"""
        mount -t tmpfs -o size=10m tmpfs {disk} || exit 90
        {command} 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.code
        find {disk}/run -name '*.tmp' > {tmp_path}/tmp.files
        mount -o remount,size=256m {disk}
        {command} 2> {tmp_path}/spare.err; echo $? > {tmp_path}/spare.code
        cp -a {disk}/run {kept}
        mkdir {tmp_path}/ro && mount -t tmpfs -o ro tmpfs {tmp_path}/ro
        {sys.executable} -m diffinject.workers.cli run --preset quick --config {config} --out {tmp_path}/ro/run \
            --no-progress 2> {tmp_path}/ro.err; echo $? > {tmp_path}/ro.code
    """
    done = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    read = lambda name: (tmp_path / name).read_text()  # noqa: E731
    assert read("full.code").strip() == "1"
    line = _one_line(read("full.err"))
    assert line.startswith(f"diffinject: error: {disk}/run/") and "no space left on the device" in line, line
    assert read("tmp.files") == ""  # no half-written file left behind
    assert read("spare.code").strip() == "0", read("spare.err")[-3000:]
    assert_same_run(reference, kept)
    assert read("ro.code").strip() == "1"
    assert _one_line(read("ro.err")) == f"diffinject: error: {tmp_path}/ro/run: read-only file system"


def test_sigint_ends_in_one_line_exit_130_and_the_rerun_resumes(config, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "diffinject.workers.cli", *_argv(config, out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "unet" / "checkpoint.pt").exists():  # inside the U-Net's training
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert _one_line(proc.stderr.read()) == "diffinject: interrupted; rerun the same command to resume"
    assert not (out / "manifests" / "unet.json").exists() and not list(out.rglob("*.tmp"))
    done = _cli(*_argv(config, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(reference, out)


def test_environment_errors_are_named_by_path_with_exit_1():
    parser = build_parser()
    cases = {
        OSError(errno.ENOSPC, "No space left on device", "/r/unet/checkpoint.pt"):
            "/r/unet/checkpoint.pt: no space left on the device; free some space and rerun the same command to resume",
        PermissionError(errno.EACCES, "Permission denied", "/r"): "/r: permission denied",
        OSError(errno.EROFS, "Read-only file system", "/r"): "/r: read-only file system",
        RuntimeError("something\nelse"): "RuntimeError: something (rerun with --debug for the traceback)",
    }
    for error, message in cases.items():
        assert explain(error, parser) == (message, 1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_an_out_folder_without_permission_is_one_line_exit_1(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    done = _cli("run", "--preset", "quick", "--no-progress", "--out", str(locked / "run"))
    assert done.returncode == 1
    assert _one_line(done.stderr) == f"diffinject: error: {locked / 'run'}: permission denied"


# ---------------------------------------------------------------------------------------------------------
# 4. bad settings: one line naming the flag or the file and setting, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------------

BAD_FLAGS = {
    ("--seed", "-1"): "--seed -1 is outside [0, 9223372036854775807]",
    ("--seed", "99999999999999999999"): "--seed 99999999999999999999 is outside [0, 9223372036854775807]",
    ("--data-seed", "-3"): "--data-seed -3 is outside",
    ("--threads", "0"): "argument --threads: 0 must be at least 1",
    ("--threads", "-1"): "argument --threads: -1 must be at least 1",
    ("--workers", "-2"): "argument --workers: -2 must be at least 0",
    ("--epochs", "0"): "--epochs 0 is outside [1, 100000]",
    ("--diffusion-steps", "0"): "--diffusion-steps 0 is outside [1, ",
    ("--k", "0"): "--k 0 is outside [1, ",
    ("--gamma", "1.5"): "--gamma 1.5 is outside [0, 1]",
    ("--max-minutes", "-1"): "argument --max-minutes: -1 must be above 0",
}


@pytest.mark.parametrize("flags", list(BAD_FLAGS))
def test_a_bad_flag_is_one_line_naming_it_and_nothing_is_written(flags, tmp_path, capsys):
    out = tmp_path / "run"
    assert _code(["run", "--preset", "quick", "--no-progress", "--out", str(out), *flags]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("diffinject: error: ") and BAD_FLAGS[flags] in line, line
    assert not out.exists()


BAD_YAML = {
    "injection: [1, 2]": "injection must be a mapping of settings, not [1, 2]",
    "injection: {gamma: high}": "injection.gamma must be a number, not 'high'",
    "classifier: {epochs: 2.5}": "classifier.epochs must be a whole number, not 2.5",
    "methods: vanilla,lff": "methods must be a list of strings or null, not 'vanilla,lff'",
    "hparams: {jtt: {first_epochs: many}}": "hparams.jtt.first_epochs must be a whole number, not 'many'",
    "misclassified_only: true": "unknown config key 'misclassified_only'",
    "[1, 2]": "must be a mapping of settings",
}


@pytest.mark.parametrize("text", list(BAD_YAML))
def test_a_bad_config_file_is_one_line_naming_the_file_and_setting(text, tmp_path, capsys):
    config, out = tmp_path / "bad.yaml", tmp_path / "run"
    config.write_text(text + "\n")
    assert _code(["run", "--preset", "quick", "--config", str(config), "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(config) in line and BAD_YAML[text] in line, line
    assert not out.exists()


BAD_UNET_CONFIGS = {
    '{"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "DownBlock2D"]}':
        "lacks up_block_types: it is not a diffusers UNet2DModel config",
    '[1, 2]': "must be a mapping of the U-Net's settings, not a list",
    '{"block_out_': "is not a JSON file",
    '{"block_out_channels": 16, "down_block_types": [], "up_block_types": []}':
        "block_out_channels must be a non-empty list, not 16",
}


@pytest.mark.parametrize("text", list(BAD_UNET_CONFIGS))
def test_a_unet_with_a_bad_config_is_one_line_naming_the_file(text, tmp_path, capsys):
    unet, out = tmp_path / "unet", tmp_path / "run"
    unet.mkdir()
    (unet / "config.json").write_text(text)
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    assert _code(["run", "--preset", "quick", "--unet", str(unet), "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(unet / "config.json") in line and BAD_UNET_CONFIGS[text] in line, line
    assert not out.exists()


def test_a_unet_whose_weights_are_cut_short_is_refused_before_any_stage(reference, tmp_path, capsys):
    unet, out = tmp_path / "unet", tmp_path / "run"
    shutil.copytree(reference / "unet", unet)
    _cut(unet / "diffusion_pytorch_model.safetensors")
    assert _code(["run", "--preset", "quick", "--unet", str(unet), "--out", str(out)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"diffinject: error: {unet / 'diffusion_pytorch_model.safetensors'}: not a whole "
                           "safetensors file"), line
    assert not out.exists()
