"""Shared test setup: one CPU thread, and one dataset cache for the whole session.

The embedded Colored MNIST takes a few seconds to build; every test that needs it shares the cache under
``$DIFFINJECT_CACHE``. A developer who already set the variable (to reuse a warm cache) keeps it.
"""

import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test cluster needs no token

_OWN_CACHE = None
if not os.environ.get("DIFFINJECT_CACHE"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="diffinject-test-cache-")
    os.environ["DIFFINJECT_CACHE"] = _OWN_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def cmnist():
    """The embedded Colored MNIST at 1 % conflicts (built once, then served from the session cache)."""
    from diffinject.core.data import colored_mnist

    return colored_mnist(1.0, 0)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """A quick-preset run folder with its tiny U-Net and biased classifier trained (shared by the Ray tests)."""
    from diffinject.core.config import make_config
    from diffinject.core.run import Run

    run = Run(tmp_path_factory.mktemp("quick-run"), make_config("quick"), progress=False)
    run.unet_dir()
    run.biased()
    return run


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module (2 CPUs), always shut down."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def planted():
    """``planted(n, seed)``: a planted two-class task as an ``ImageSet``: class 1 has a bright top half on random
    noise, 28 px, 3 channels, and no bias labels (-1), for the methods' learning and resume tests."""
    from diffinject.core.data import ImageSet

    def build(n: int = 240, seed: int = 0) -> ImageSet:
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 2
        images = torch.randint(0, 60, (n, 3, 28, 28), generator=g, dtype=torch.uint8)
        images[labels == 1, :, :14] += 150
        return ImageSet(images, labels, torch.full_like(labels, -1))

    return build
