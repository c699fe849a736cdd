"""Faults with two injector replicas (a cluster of its own: 4 logical CPUs): kill -9 one replica under load and no
request fails at all, because the Ingress's one retry lands on the live replica. The one-replica case (503 with
Retry-After, then success) is in tests/test_service.py; benchmarks/fault_load.py measures both."""

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests


@pytest.fixture(scope="module")
def two_replicas(quick_run):
    import ray
    from ray import serve

    from diffinject.service.app import Ingress, InjectorDeployment

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        injector = InjectorDeployment.options(num_replicas=2, max_ongoing_requests=64,
                                              ray_actor_options={"num_cpus": 1}).bind(
            datasets={quick_run.dir.name: {"preset": "quick"}}, root=str(quick_run.dir.parent), threads=1)
        serve.run(Ingress.options(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5}).bind(injector),
                  name="faults", route_prefix="/")
        yield f"http://127.0.0.1:{port}", serve.get_deployment_handle("Injector", app_name="faults")
    finally:
        serve.shutdown()
        ray.shutdown()


def test_with_two_replicas_a_killed_one_costs_no_request(two_replicas, quick_run):
    url, handle = two_replicas
    pids = set()
    for _ in range(100):
        pids.add(handle.info.remote().result()["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2
    pool = [int(i) for i in quick_run.mined()[:6]]
    body = {"dataset": quick_run.dir.name, "conflict_indices": pool, "num_samples": 4, "steps": 5}

    def post(seed):
        return requests.post(f"{url}/inject", json=body | {"seed": seed}, timeout=300).status_code

    with ThreadPoolExecutor(4) as clients:
        futures = [clients.submit(post, s) for s in range(24)]
        time.sleep(2.0)
        os.kill(min(pids), signal.SIGKILL)
        codes = [f.result() for f in futures]
    assert codes == [200] * len(codes), codes
