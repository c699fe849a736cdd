"""Faults under load: 8 clients on POST /inject, one kill -9 of an injector replica mid-run.

    python benchmarks/fault_load.py                        # 1 and 2 injector replicas, 80 requests each
    python benchmarks/fault_load.py --replicas 2 --requests 40
    python benchmarks/fault_load.py --serve-mode haproxy --out benchmarks/results/fault_load_haproxy

Starts a local Ray cluster and the service on the quick preset's tiny U-Net (as benchmarks/service_load.py does),
with ``--replicas`` injector replicas. Client threads send small requests; ``--kill-after`` seconds in, the
process of one injector replica is killed with SIGKILL. A request that fails is retried once, after its
``Retry-After`` (at most 30 s). Reports, per replica count: first-attempt failures by status, the responses lost
after that one retry, the seconds from the kill until a request sent after it succeeds, and the slowest request.
Targets (issue "Faults"): no 500, nothing lost after one retry; with two replicas, no failure at all.
Writes ``{--out}.md`` and ``{--out}.json`` (default ``benchmarks/results/fault_load``).
"""

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
from collections import Counter

import requests

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from service_load import (add_service_options, driver_handle, local_serve, quick_request,
                          use_serve_mode, write_results)


def replica_pids(handle, replicas: int, tries: int = 200) -> list[int]:
    """The pids of the injector replicas, found by asking the deployment until every replica has answered."""
    pids: set[int] = set()
    for _ in range(tries):
        pids.add(handle.info.remote().result()["pid"])
        if len(pids) == replicas:
            break
    return sorted(pids)


def drive_with_kill(url: str, body: dict, clients: int, total: int, kill_after: float, pid: int) -> dict:
    """``total`` requests from ``clients`` threads; ``pid`` killed ``kill_after`` s in. One retry per failure.

    A client that has sent its share keeps sending until it has sent one request after the kill, so a fast
    machine that would finish ``total`` before the kill still measures it (``requests`` may then exceed ``total``)."""
    events, lock = [], threading.Lock()  # (start, end, status, retried status or None)
    remaining = iter(range(total))
    killed = threading.Event()

    def send(session) -> tuple[int, float]:
        try:
            r = session.post(f"{url}/inject", json=body, timeout=300)
            return r.status_code, float(r.headers.get("Retry-After", 1))
        except requests.RequestException:
            return 0, 1.0  # no HTTP answer at all

    def client():
        session = requests.Session()
        sent_after_kill = False
        while True:
            with lock:
                spent = next(remaining, None) is None
            if spent and sent_after_kill:
                return
            sent_after_kill = killed.is_set()
            t0 = time.perf_counter()
            status, wait = send(session)
            t1 = time.perf_counter()
            retried = None
            if status != 200:
                time.sleep(min(wait, 30.0))
                retried, _ = send(session)
            with lock:
                events.append((t0, t1, status, retried))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(kill_after)
    t_kill = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    killed.set()
    for t in threads:
        t.join()
    first = Counter(str(s) for _, _, s, _ in events if s != 200)
    after_kill = [e for _, e, s, _ in [(s0, e, s, r) for s0, e, s, r in events if s0 >= t_kill] if s == 200]
    return {"requests": len(events), "failed_first_attempt": sum(first.values()), "by_status": dict(first),
            "lost_after_one_retry": sum(1 for *_, s, r in events if s != 200 and r != 200),
            "server_errors_500": sum(1 for *_, s, r in events if s == 500 or r == 500),
            "seconds_until_success_after_kill": round(min(after_kill) - t_kill, 2) if after_kill else None,
            "slowest_request_s": round(max(e - s for s, e, *_ in events), 2),
            "wall_s": round(time.perf_counter() - start, 2), "kill_at_s": round(t_kill - start, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="1,2", help="injector replica counts to run, one kill each")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=80, help="requests per replica count")
    p.add_argument("--samples", type=int, default=2, help="synthetic samples per request")
    p.add_argument("--steps", type=int, default=5, help="DDIM steps per request")
    p.add_argument("--kill-after", type=float, default=3.0, help="seconds into the load to kill a replica")
    p.add_argument("--retry-after", type=int, default=10, help="the service's retry_after_s (deploy/serve.yaml)")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    add_service_options(p, "fault_load")
    args = p.parse_args()
    use_serve_mode(args.serve_mode)

    from ray import serve

    from diffinject.service.app import Ingress, InjectorDeployment

    _, _, body = quick_request(args.runs, args.samples, args.steps)
    rows = []
    with local_serve(args.cpus) as url:
        for replicas in (int(r) for r in args.replicas.split(",")):
            injector = InjectorDeployment.options(
                num_replicas=replicas, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1},
                user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
            ).bind(datasets={"quick": {"preset": "quick"}}, root=args.runs, threads=1)
            app = Ingress.options(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5}).bind(
                injector, retry_after_s=args.retry_after, max_requests_per_key=256)
            serve.run(app, name="fault", route_prefix="/")
            handle = driver_handle("Injector", "fault")
            pids = replica_pids(handle, replicas)
            for _ in range(2 * replicas):  # warm every replica's content cache and lazy imports
                requests.post(f"{url}/inject", json=body, timeout=300)
            row = {"serve_mode": args.serve_mode, "replicas": replicas, "clients": args.clients} | drive_with_kill(
                url, body, args.clients, args.requests, args.kill_after, pids[0])
            rows.append(row)
            print(json.dumps(row), flush=True)
            serve.delete("fault")

    cmd = ("python benchmarks/fault_load.py " + " ".join(sys.argv[1:])).strip()
    lines = [f"# Fault load: POST /inject under {args.clients} clients, one injector replica killed with kill -9", "",
             f"`{cmd}`; quick-preset U-Net, {args.samples} samples x {args.steps} DDIM steps per request, kill "
             f"{args.kill_after} s in; a failed request is retried once after its Retry-After "
             f"({args.retry_after} s); {platform.processor() or platform.machine()}, {os.cpu_count()} cores.", "",
             "| injector replicas | requests | failed (first try) | by status | lost after one retry | 500s | "
             "s until success after the kill | slowest request s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['replicas']} | {r['requests']} | {r['failed_first_attempt']} | {r['by_status'] or '-'} | "
                     f"{r['lost_after_one_retry']} | {r['server_errors_500']} | "
                     f"{r['seconds_until_success_after_kill']} | {r['slowest_request_s']} |")
    write_results(args.out, lines, {"command": cmd, "rows": rows})


if __name__ == "__main__":
    main()
