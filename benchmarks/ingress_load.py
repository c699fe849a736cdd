"""The ingress alone: POST /inject against a stub injector that answers at once, so the requests/s ceiling of the
HTTP edge (proxy, FastAPI checks, pairing, base64) is known on this machine.

    python benchmarks/ingress_load.py                          # 1 and 2 ingress replicas, 32 clients
    python benchmarks/ingress_load.py --replicas 1,2,4 --requests 3000

The stub has the Injector deployment's interface (``describe``, ``mine``, ``generate``) and returns ready PNGs,
so every second measured is the ingress's and the proxy's. The load generator (client threads from
benchmarks/service_load.py) runs on the same machine, sharing its cores. Writes ``{--out}.md`` and ``{--out}.json``
(default ``benchmarks/results/ingress_load``).
"""

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from service_load import drive, local_serve, write_results  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="1,2", help="ingress replica counts")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--samples", type=int, default=4, help="synthetic samples per request")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--out", default=str(RESULTS / "ingress_load"), help="writes OUT.md and OUT.json")
    args = p.parse_args()

    import torch
    from ray import serve

    from core.export import png_bytes
    from core.injection import InjectionConfig
    from service.app import Ingress

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

        async def generate(self, job: dict) -> dict:
            n = len(job["content"])
            return {"png": [self.png] * n, "labels": [self.labels[int(c)] for c in job["content"]],
                    "content": job["content"].tolist(), "style": job["style"].tolist(), "inject_seconds": 0.0,
                    "unet": "stub", "evaluations_per_sample": 0.0, "batch_requests": 1}

    body = {"dataset": "stub", "conflict_indices": list(range(0, 60, 3)), "num_samples": args.samples, "seed": 0}
    rows = []
    with local_serve(args.cpus) as url:
        for replicas in (int(r) for r in args.replicas.split(",")):
            app = Ingress.options(num_replicas=replicas, max_ongoing_requests=256,
                                  ray_actor_options={"num_cpus": 0.5}).bind(
                StubInjector.options(max_ongoing_requests=1024).bind(), max_requests_per_key=1024)
            serve.run(app, name="ingress", route_prefix="/")
            drive(url, body, 4, 50)  # warm-up
            row = {"ingress_replicas": replicas} | drive(url, body, args.clients, args.requests)
            rows.append(row)
            print(json.dumps(row), flush=True)
            serve.delete("ingress")

    cmd = ("python benchmarks/ingress_load.py " + " ".join(sys.argv[1:])).strip()
    lines = [f"# Ingress alone: POST /inject against a stub injector, {args.clients} clients", "",
             f"`{cmd}`; {args.samples} samples per request, {args.requests} requests per row; the load generator on "
             f"the same machine ({platform.processor() or platform.machine()}, {os.cpu_count()} cores).", "",
             "| ingress replicas | requests/s | p50 s | p95 s | p99 s | errors |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ingress_replicas']} | {r['requests_per_s']} | {r['p50_s']} | {r['p95_s']} | "
                     f"{r['p99_s']} | {r['errors']} |")
    write_results(args.out, lines, {"command": cmd, "rows": rows})


if __name__ == "__main__":
    main()
