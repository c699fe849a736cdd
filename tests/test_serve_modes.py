"""Serve's throughput mode with HAProxy, what deploy/rayservice.yaml runs, against the real service. A module of
its own: it starts its cluster in a subprocess (Serve reads the mode when Ray starts), so no other test cluster
shares the cores with it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path


def test_in_the_haproxy_serve_mode_a_killed_replica_costs_no_request(quick_run, tmp_path):
    """deploy/rayservice.yaml runs Serve's throughput mode with HAProxy (the Ingress serves HTTP itself, gRPC to the
    Injector). The same kill under load, driven by benchmarks/fault_load.py in a process of its own (Serve reads
    the mode when Ray starts): every request answered 200 on its first try, with the real Injector."""
    # a copy of the trained quick run (nothing retrained): the benchmark opens its folder as a Run, and this
    # process holds the original's lock
    shutil.copytree(quick_run.dir, tmp_path / "runs" / "quick")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "fault_load.py"), "--serve-mode", "haproxy",
                           "--replicas", "2", "--clients", "4", "--requests", "24", "--kill-after", "2",
                           "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
                          timeout=600, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]  # its own words, if it fails
    [row] = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert row["serve_mode"] == "haproxy" and row["requests"] >= 24  # more where the load outlasts its share
    assert row["failed_first_attempt"] == 0 and row["server_errors_500"] == 0, row
    assert row["seconds_until_success_after_kill"] is not None
