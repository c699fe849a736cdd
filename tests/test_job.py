"""``ray job submit ... -- python -m diffinject.workers.job``: the whole quick pipeline as a job on a local Ray head.

The head gets its own ports and temp dir and runs in its own process group (``ray start --block``); the
teardown kills that group and every process that names the temp dir or joins its GCS (the job's driver), by
pid. ``ray stop --force`` would kill every Ray cluster on the machine, a developer's ``serve run`` or another
test session's included. Token auth is off for both the head and the client (``RAY_AUTH_MODE=disabled``).
About two minutes on two CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from diffinject.core.injection import Synthetic

ROOT = Path(__file__).resolve().parent.parent
_RAY_BESIDE = Path(sys.executable).with_name("ray")  # the CLI of this Python's Ray, else the first on PATH
RAY = str(_RAY_BESIDE) if _RAY_BESIDE.exists() else shutil.which("ray")
# the documented runtime env (it keeps the upload under Ray's 100 MiB), plus what a development checkout holds: never
# uploaded with the working dir, even where .gitignore is not honoured (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)
EXCLUDES = yaml.safe_load((ROOT / "deploy" / "job-runtime-env.yaml").read_text())["excludes"] + [
    "/runs/", "/.whl/", "/build/", "/.benchmarks/", ".pytest_cache/", "__pycache__/", "*.egg-info/", "checkpoint.pt",
    "*.tmp"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict:
    # no token auth, no telemetry; on SIGTERM tear down at once (Ray 2.60 drains a node for up to 30 s first)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("RAY_ADDRESS", None)
    return env


def _pids_of(temp_dir: str, gcs_port: int) -> list[int]:
    """This head's processes: those whose command line names its temp dir, and job drivers (whose RAY_ADDRESS
    is its GCS)."""
    pids, address = [], f":{gcs_port}"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                env = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if temp_dir in cmdline or any(e.startswith("RAY_ADDRESS=") and e.endswith(address) for e in env):
                pids.append(int(proc.name))
    return pids


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ray_head():
    """A local head on free ports; yields the dashboard address for ``ray job submit``."""
    if RAY is None:
        pytest.fail("the `ray` command is not installed beside this Python (pip install 'ray[default]')")
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    gcs, dash, client, agent, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr = _free_ports(9)
    log = open(Path(temp_dir) / "head.log", "w+")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(rt_agent), "--node-manager-port", str(node_mgr),
         "--object-manager-port", str(obj_mgr), "--num-cpus", "2", "--disable-usage-stats",
         "--temp-dir", temp_dir],
        cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            if head.poll() is not None:
                log.seek(0)
                pytest.fail(f"ray start exited with {head.returncode}:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"the dashboard at {address} did not answer within 120 s:\n{log.read()[-4000:]}")
                time.sleep(1)
        yield address
    finally:
        # `ray stop --force`, for this head only: SIGKILL its process group, then whatever names its temp dir
        _kill_group(head.pid, signal.SIGKILL)
        head.wait()
        deadline = time.time() + 20
        while (left := _pids_of(temp_dir, gcs)) and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_runs_the_pipeline(ray_head, tmp_path):
    out = tmp_path / "run"
    cmd = [RAY, "job", "submit", "--address", ray_head, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
           sys.executable, "-m", "diffinject.workers.job", "--preset", "quick", "--methods", "vanilla,diffinject",
           "--workers", "1", "--no-progress", "--out", str(out)]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as e:
        out_text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        pytest.fail(f"ray job submit did not finish within 420 s:\n{out_text[-4000:]}")
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"job failed ({res.returncode}) after {time.time() - t0:.0f} s:\n{log[-6000:]}"
    assert "SUCCEEDED" in log or "succeeded" in log, log[-3000:]
    assert f"run folder {out}" in log, log[-3000:]  # workers.job says where the run folder is
    assert "1 injection worker" in log, log[-3000:]  # the driver joined the cluster, not a local Ray of its own

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"vanilla", "diffinject"}
    for m in metrics["methods"].values():
        assert 0 <= m["unbiased"] <= 100
    syn = Synthetic.load(out / "synthetic" / "samples.pt")
    assert len(syn.labels) == len(syn.images) == 24  # the quick preset's num_samples, from the one actor
    assert (out / "report.md").read_text().strip()
