"""Load on the Serve app: 1, 8 and 32 concurrent clients, with batching on and off, side by side.

    python benchmarks/service_load.py                      # quick model, 64 requests per level
    python benchmarks/service_load.py --requests 32 --samples 4 --steps 10
    python benchmarks/service_load.py --gpus 1 --cpus 8 --out benchmarks/results/service_load_gpu   # on a GPU
    python benchmarks/service_load.py --serve-mode haproxy --out benchmarks/results/service_load_haproxy

Starts a local Ray cluster and the service (Ingress + Injector, one injector replica) on the quick preset's
tiny U-Net, then drives POST /inject from N client threads for a fixed number of requests per level. The same
run repeats with ``max_batch_size`` 1 (batching off), so the gain is a ratio measured on one machine in one
run. ``--gpus`` gives the injector replica a GPU (the ``num_gpus`` of its ``ray_actor_options``, as in
deploy/serve.yaml); it then generates on CUDA. ``--bucket`` is the Injector's fixed U-Net batch
(deploy/serve.yaml's 8 on a CPU; deploy/rayservice.yaml's 64 on its GPUs), and the in-process bound runs at the
same one. Writes ``{--out}.md`` and ``{--out}.json`` (default
``benchmarks/results/service_load``).
"""

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results"

# Ray Serve's request paths, chosen by environment variables read when Ray starts (deploy/README.md): "default" is
# Serve's Python proxy; "throughput" sets RAY_SERVE_THROUGHPUT_OPTIMIZED (user code on the replica's event loop,
# gRPC between deployments, ingress replicas serving HTTP themselves); "haproxy" adds HAProxy (a C load balancer)
# in front of those ingress replicas instead of the Python proxy: what deploy/rayservice.yaml runs.
SERVE_MODES = {
    "default": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def use_serve_mode(mode: str) -> None:
    """Sets ``SERVE_MODES[mode]``'s variables in this process before Ray starts (Serve reads them at import, in
    every Ray process, which inherit them): call it before ``from ray import serve``."""
    if "ray.serve" in sys.modules:
        raise RuntimeError("use_serve_mode must run before ray.serve is imported")
    for name in set().union(*SERVE_MODES.values()):
        os.environ.pop(name, None)
    os.environ.update(SERVE_MODES[mode])


@contextlib.contextmanager
def local_serve(cpus: int, gpus: float = 0):
    """A local Ray cluster with Serve on a free port of 127.0.0.1; yields its URL; always shut down."""
    import ray
    from ray import serve

    ray.init(num_cpus=cpus, num_gpus=1 if gpus else 0, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def driver_handle(deployment: str, app: str):
    """A handle to ``deployment`` that this synchronous driver can call with ``.remote().result()`` in every serve
    mode: the throughput modes give new handles no router loop of their own, so one is asked for (an init option
    Serve has no public setter for)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    return handle


def add_service_options(p, out: str) -> None:
    """The options the service benchmarks share: Serve's request path, the quick run's parent folder, and the
    results' stem (``benchmarks/results/<out>`` by default)."""
    p.add_argument("--serve-mode", default="default", choices=list(SERVE_MODES),
                   help="Serve's request path (haproxy: what deploy/rayservice.yaml runs)")
    p.add_argument("--runs", default="runs/bench-service")
    p.add_argument("--out", default=str(RESULTS / out), help="writes OUT.md and OUT.json")


def write_results(out: str, lines: list[str], payload: dict) -> None:
    """``out.md`` (the table lines) and ``out.json``; the table printed too."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{out}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))


def quick_request(runs: str, samples: int, steps: int):
    """The quick preset's run folder under ``runs`` with its U-Net trained here once (so replicas only load it),
    its mined pool, and a ``POST /inject`` body that injects ``samples`` samples at ``steps`` DDIM steps."""
    from diffinject.core.config import make_config
    from diffinject.core.run import Run

    run = Run(Path(runs) / "quick", make_config("quick"), progress=False)
    run.unet_dir()
    pool = [int(i) for i in run.mined()]
    return run, pool, {"dataset": "quick", "conflict_indices": pool, "num_samples": samples, "steps": steps, "seed": 0}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def drive(url: str, body: dict, clients: int, total: int) -> dict:
    """``total`` requests from ``clients`` threads (each keeps one request in flight); latency and throughput."""
    latencies, batches, errors, lock = [], Counter(), Counter(), threading.Lock()
    remaining = iter(range(total))

    def client():
        session = requests.Session()
        while True:
            with lock:
                if next(remaining, None) is None:
                    return
            t0 = time.perf_counter()
            try:
                r = session.post(f"{url}/inject", json=body, timeout=600)
                ok = r.status_code == 200
                out = r.json() if ok else None
            except requests.RequestException as e:
                ok, out = False, type(e).__name__
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    batches[out["batch_requests"]] += 1
                else:
                    errors[str(out or r.status_code)] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = len(latencies)
    return {"clients": clients, "requests": total, "errors": sum(errors.values()), "error_kinds": dict(errors),
            "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3),
            "p99_s": round(percentile(latencies, 99), 3), "requests_per_s": round(done / wall, 2),
            "images_per_s": round(done * body["num_samples"] / wall, 2),
            "mean_batch_requests": round(statistics.fmean(
                [b for b, n in batches.items() for _ in range(n)]), 2) if batches else 0.0,
            "batch_requests_seen": dict(sorted(batches.items())), "wall_s": round(wall, 2)}


def in_process_ceiling(run, pool: list[int], args) -> dict:
    """Images/s of the injector itself at one request's size and at a full batch's: the most batching can gain."""
    import numpy as np
    import torch

    from diffinject.core.injection import plan_pairs
    from diffinject.workers.injector import Injector

    torch.set_num_threads(args.threads)
    device = "cuda" if args.gpus and torch.cuda.is_available() else "cpu"
    injector = Injector(run.dir, threads=args.threads, device=device, bucket=args.bucket)
    tr = run.ds.train
    cfg = {"steps": args.steps, "t_edit": 500, "gamma": 0.5, "batch_size": args.samples * args.max_batch_size}
    rates = {}
    for n in (args.samples, args.samples * args.max_batch_size):
        pairs = plan_pairs(tr.labels, np.asarray(pool), n, 0)
        injector.inject(tr.images, tr.labels, pairs.content, pairs.style, cfg)  # warm the content cache
        t0 = time.perf_counter()
        injector.inject(tr.images, tr.labels, pairs.content, pairs.style, cfg)
        rates[n] = round(n / (time.perf_counter() - t0), 2)
    small, large = rates[args.samples], rates[args.samples * args.max_batch_size]
    return {"small": small, "large": large, "large_samples": args.samples * args.max_batch_size,
            "ratio": round(large / small, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--samples", type=int, default=4, help="synthetic samples per request")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per request")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait", type=float, default=0.05)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the injector replica (more than the "
                   "free cores makes CPU inference far slower: leave room for the proxy and the ingress)")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs of the injector replica (0: CPU)")
    p.add_argument("--ingress-replicas", type=int, default=1, help="Ingress replicas (HTTP handling, PNG coding)")
    p.add_argument("--bucket", type=int, default=8, help="the Injector's fixed U-Net batch, in the service and the "
                   "in-process bound (deploy/serve.yaml: 8 on CPUs; deploy/rayservice.yaml: 64 on GPUs, which pay per "
                   "U-Net call, not per image)")
    add_service_options(p, "service_load")
    args = p.parse_args()
    use_serve_mode(args.serve_mode)

    import torch
    from ray import serve

    from diffinject.service.app import Ingress, InjectorDeployment

    run, pool, body = quick_request(args.runs, args.samples, args.steps)
    clients = [int(c) for c in args.clients.split(",")]
    table = []
    with local_serve(args.cpus, args.gpus) as url:
        for mode, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
            injector = InjectorDeployment.options(
                max_ongoing_requests=max(2 * batch, 8), ray_actor_options={"num_cpus": args.threads,
                                                                        "num_gpus": args.gpus},
                user_config={"max_batch_size": batch, "batch_wait_timeout_s": args.batch_wait if batch > 1 else 0.0},
            ).bind(datasets={"quick": {"preset": "quick"}}, root=args.runs, threads=args.threads, bucket=args.bucket)
            app = Ingress.options(max_ongoing_requests=256, num_replicas=args.ingress_replicas,
                                  ray_actor_options={"num_cpus": 0.5}).bind(
                injector, max_samples=max(256, args.samples))
            serve.run(app, name="bench", route_prefix="/")
            drive(url, body, 1, 2)  # warm-up: content cache, lazy imports
            for c in clients:
                row = {"mode": mode, "max_batch_size": batch} | drive(url, body, c, args.requests)
                table.append(row)
                print(json.dumps(row), flush=True)
            serve.delete("bench")

    ceiling = in_process_ceiling(run, pool, args)
    device = torch.cuda.get_device_name(0) if args.gpus and torch.cuda.is_available() else "CPU"
    by = {(r["mode"], r["clients"]): r for r in table}
    ratios = {c: round(by[("batched", c)]["images_per_s"] / max(by[("unbatched", c)]["images_per_s"], 1e-9), 2)
              for c in clients}
    # the service against what the injector does alone at a full batch: how much HTTP, coding and queueing cost
    of_bound = {c: round(by[("batched", c)]["images_per_s"] / ceiling["large"], 2) for c in clients}
    cmd = "python benchmarks/service_load.py " + " ".join(sys.argv[1:])
    lines = [f"# Service load: POST /inject, {args.samples} samples x {args.steps} DDIM steps per request", "",
             f"`{cmd.strip()}`; quick-preset U-Net, one injector replica with {args.threads} torch thread(s) "
             f"on {device}, U-Net batches of {args.bucket} (bucket); {args.ingress_replicas} Ingress replica(s); "
             f"serve mode {args.serve_mode}; "
             f"{args.requests} requests per level; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores.", "",
             "| mode | clients | p50 s | p95 s | p99 s | req/s | images/s | errors | mean batch (requests) | batches seen |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['mode']} | {r['clients']} | {r['p50_s']} | {r['p95_s']} | {r['p99_s']} | "
                     f"{r['requests_per_s']} | {r['images_per_s']} | {r['errors']} | {r['mean_batch_requests']} | "
                     f"{r['batch_requests_seen']} |")
    lines += ["", "Batched / unbatched images/s: " + ", ".join(f"{c} clients {ratios[c]}x" for c in clients), "",
              "In-process bound on any batching gain (same U-Net, threads and bucket, no HTTP): "
              f"{ceiling['small']} images/s "
              f"at {args.samples} samples per call, {ceiling['large']} at {ceiling['large_samples']} "
              f"({ceiling['ratio']}x).", "",
              "Batched service / in-process bound at a full batch: "
              + ", ".join(f"{c} clients {of_bound[c]}" for c in clients)]
    write_results(args.out, lines, {"command": cmd.strip(), "device": device, "serve_mode": args.serve_mode,
                                    "bucket": args.bucket,
                                    "ingress_replicas": args.ingress_replicas,
                                    "rows": table, "ratios": ratios, "service_over_bound": of_bound,
                                    "in_process_ceiling": ceiling})


if __name__ == "__main__":
    main()
