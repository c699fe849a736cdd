"""The ingress alone: POST /inject against a stub injector that answers at once, so the requests/s ceiling of the
HTTP edge (proxy, FastAPI checks, pairing, base64) is known on this machine, for each of Serve's request paths.

    python benchmarks/ingress_load.py                          # every mode, 1 and 2 ingress replicas, 32 clients
    python benchmarks/ingress_load.py --modes haproxy --replicas 1,2,4 --requests 3000

The stub has the Injector deployment's interface (``describe``, ``mine``, ``generate``) and returns ready PNGs,
so every second measured is the ingress's and the proxy's. ``--modes`` (``SERVE_MODES`` in
benchmarks/service_load.py): ``default`` (Serve's Python proxy), ``throughput`` (RAY_SERVE_THROUGHPUT_OPTIMIZED=1)
and ``haproxy`` (that plus RAY_SERVE_ENABLE_HA_PROXY=1, as deploy/rayservice.yaml runs). Serve reads these when
Ray starts, so each mode runs in a process of its own, one after the other. A last row, ``no Ray``, is the same
FastAPI route answering a constant from plain uvicorn: what the load generator and one Python server reach on
these cores, the ceiling of every row above it. The load generator (client threads from
benchmarks/service_load.py) runs on the same machine, sharing its cores. Writes ``{--out}.md`` and ``{--out}.json``
(default ``benchmarks/results/ingress_load``).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from service_load import SERVE_MODES, drive, local_serve, use_serve_mode, write_results

RESULTS = Path(__file__).parent / "results"
NO_RAY = "no Ray"


def one_mode(mode: str, args) -> list[dict]:
    """Every ingress replica count in ``mode``, in this process (which must not have imported Ray Serve yet)."""
    use_serve_mode(mode)
    import torch
    from ray import serve

    from diffinject.core.export import png_bytes
    from diffinject.core.injection import InjectionConfig
    from diffinject.service.app import Ingress

    @serve.deployment(name="Injector")
    class StubInjector:
        """The Injector deployment's interface without a model: ready PNGs, at once."""

        def __init__(self):
            self.png = png_bytes(torch.zeros(3, 28, 28, dtype=torch.uint8))
            self.labels = [i % 10 for i in range(3000)]

        def describe(self) -> dict:
            return {"stub": {"labels": self.labels, "num_classes": 10, "image_size": [3, 28, 28], "k": 5,
                             "model": "stub", "injection": asdict(InjectionConfig())}}

        def mine(self, name: str, k: int) -> list[int]:
            return list(range(10 * k))

        async def generate(self, job) -> dict:  # a diffinject.service.job.InjectJob
            n = len(job.content)
            return {"png": [self.png] * n, "labels": [self.labels[int(c)] for c in job.content],
                    "content": job.content.tolist(), "style": job.style.tolist(), "inject_seconds": 0.0,
                    "unet": "stub", "evaluations_per_sample": 0.0, "batch_requests": 1}

    rows = []
    with local_serve(args.cpus) as url:
        for replicas in (int(r) for r in args.replicas.split(",")):
            app = Ingress.options(num_replicas=replicas, max_ongoing_requests=256,
                                  ray_actor_options={"num_cpus": 0.5}).bind(
                StubInjector.options(max_ongoing_requests=1024).bind(), max_requests_per_key=1024)
            serve.run(app, name="ingress", route_prefix="/")
            drive(url, args.body, 4, 50)  # warm-up
            row = {"mode": mode, "ingress_replicas": replicas} | drive(url, args.body, args.clients, args.requests)
            rows.append(row)
            print(json.dumps(row), flush=True)
            serve.delete("ingress")
    return rows


def no_ray(args) -> dict:
    """The load generator against the same route answering a constant from plain uvicorn (one process)."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        server = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys, uvicorn\nfrom fastapi import FastAPI\napp = FastAPI()\n"
            "@app.post('/inject')\nasync def inject(body: dict):\n    return {'batch_requests': 1}\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); open(sys.argv[1], 'w').write(str(s.getsockname()[1]))\n"
            "uvicorn.Server(uvicorn.Config(app, log_level='warning')).run(sockets=[s])\n"), str(port_file)])
        try:
            for _ in range(200):
                if port_file.exists() and port_file.read_text():
                    break
                time.sleep(0.1)
            url = f"http://127.0.0.1:{port_file.read_text()}"
            time.sleep(1.0)
            drive(url, args.body, 4, 50)
            return {"mode": NO_RAY, "ingress_replicas": 1} | drive(url, args.body, args.clients, args.requests)
        finally:
            server.terminate()
            server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(SERVE_MODES), help="Serve request paths, from " + ", ".join(SERVE_MODES))
    p.add_argument("--replicas", default="1,2", help="ingress replica counts")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--samples", type=int, default=4, help="synthetic samples per request")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print its rows
    p.add_argument("--out", default=str(RESULTS / "ingress_load"), help="writes OUT.md and OUT.json")
    args = p.parse_args()
    args.body = {"dataset": "stub", "conflict_indices": list(range(0, 60, 3)), "num_samples": args.samples, "seed": 0}
    if args.one_mode:
        print("ROWS " + json.dumps(one_mode(args.one_mode, args)), flush=True)
        return

    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in SERVE_MODES]
    if unknown:
        sys.exit(f"ingress_load.py: unknown mode {unknown[0]!r}; choose from {', '.join(SERVE_MODES)}")
    rows = []
    for mode in modes:  # a process each: Serve reads its mode's variables when Ray starts
        out = subprocess.run([sys.executable, __file__, "--one-mode", mode] + sys.argv[1:], stdout=subprocess.PIPE,
                             text=True, check=True).stdout
        rows += json.loads(next(line[5:] for line in out.splitlines() if line.startswith("ROWS ")))
    rows.append(no_ray(args))
    print(json.dumps(rows[-1]), flush=True)

    cmd = ("python benchmarks/ingress_load.py " + " ".join(sys.argv[1:])).strip()
    base = {r["ingress_replicas"]: r["requests_per_s"] for r in rows if r["mode"] == "default"}
    lines = [f"# Ingress alone: POST /inject against a stub injector, {args.clients} clients", "",
             f"`{cmd}`; {args.samples} samples per request, {args.requests} requests per row; the load generator on "
             f"the same machine ({platform.processor() or platform.machine()}, {os.cpu_count()} cores). Modes: "
             "benchmarks/service_load.py `SERVE_MODES`; `no Ray` is the route answering a constant from plain "
             "uvicorn, the ceiling of this load generator on these cores.", "",
             "| mode | ingress replicas | requests/s | x default | p50 s | p95 s | p99 s | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["requests_per_s"] / base[r["ingress_replicas"]] if r["ingress_replicas"] in base else None
        lines.append(f"| {r['mode']} | {r['ingress_replicas']} | {r['requests_per_s']} | "
                     f"{f'{ratio:.2f}' if ratio else '-'} | {r['p50_s']} | {r['p95_s']} | {r['p99_s']} | "
                     f"{r['errors']} |")
    write_results(args.out, lines, {"command": cmd, "modes": {m: SERVE_MODES[m] for m in modes}, "rows": rows})


if __name__ == "__main__":
    main()
