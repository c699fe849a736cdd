"""Injection actors: same pixels as in-process core, content cache, fan-out over several actors."""

from dataclasses import replace

import numpy as np
import torch

from diffinject.core.diffusion import ddim_scheduler, load_unet
from diffinject.core.injection import InjectionConfig, inject, plan_pairs
from diffinject.workers.injector import ContentCache, Injector, check_job, fan_out, injector_actor, run_isolated

CFG = InjectionConfig(steps=5, num_samples=12, batch_size=16)


def _pairs(run):
    return plan_pairs(run.ds.train.labels, run.mined(), CFG.num_samples, seed=3)


def _in_process(run, pairs):
    unet_dir = run.unet_dir()
    tr = run.ds.train
    return inject(load_unet(unet_dir), ddim_scheduler(unet_dir), tr.images, tr.labels, pairs, CFG, seed=7,
                  progress=False)


def test_lru_cache_evicts_oldest_and_counts():
    cache = ContentCache(capacity=2)
    a, b = cache.scope("m", "d", 5, 500), cache.scope("m", "other", 5, 500)
    a[1], a[2] = "x", "y"
    assert 1 in a and a[1] == "x" and 1 not in b  # scopes do not see each other's entries
    a[3] = "z"  # evicts 2, the least recently used (1 was just read)
    assert 2 not in a and 1 in a and 3 in a
    assert cache.stats()["entries"] == 2 and cache.stats()["hits"] == 3 and cache.stats()["misses"] == 2


def test_run_isolated_fails_only_the_job_that_fails_alone():
    """A group that raises is split until the failing job stands alone; the others get their results."""
    calls = []

    def run_group(jobs):
        calls.append(len(jobs))
        if any(j == "poison" for j in jobs):
            raise RuntimeError("boom\nsecond line")
        return [{"ok": j} for j in jobs]

    out = run_isolated(["a", "b", "poison", "c", "d"], run_group)
    assert [o.get("ok") for o in out] == ["a", "b", None, "c", "d"]
    assert out[2] == {"error": {"status": 500, "field": None, "message": "RuntimeError: boom"}}
    assert calls[0] == 5 and 1 in calls


def test_check_job_names_the_field():
    job = {"seed": 3, "content": np.array([0, 1]), "style": np.array([2, 3]), "cfg": {"steps": 5, "gamma": 0.5}}
    assert check_job(job, 10) is None
    assert check_job(job | {"seed": 2**63}, 10)["field"] == "seed"
    assert check_job(job | {"seed": -1}, 10)["field"] == "seed"
    assert check_job(job | {"style": np.array([2, 10])}, 10)["field"] == "style"
    assert check_job(job | {"content": np.array([0])}, 10)["field"] == "style"  # one style per content
    assert check_job(job | {"cfg": {"gamma": 2.0}}, 10)["field"] == "cfg.gamma"
    assert check_job(job | {"cfg": {"steps": 1}}, 10)["field"] == "cfg.steps"


def test_injector_cache_is_hit_on_reuse_and_changes_nothing(quick_run):
    pairs = _pairs(quick_run)
    tr = quick_run.ds.train
    injector = Injector(quick_run.dir, threads=1)
    first = injector.inject(tr.images, tr.labels, pairs.content, pairs.style, CFG, seed=7)
    distinct = len(np.unique(pairs.content))
    assert first.cache["misses"] == distinct and first.cache["hits"] == 0 and first.cache["entries"] == distinct
    again = injector.inject(tr.images, tr.labels, pairs.content, pairs.style, CFG, seed=7)
    assert again.cache["hits"] == distinct and again.cache["misses"] == distinct  # nothing inverted twice
    assert again.evaluations < first.evaluations  # the content inversions were skipped
    assert torch.equal(first.synthetic.images, again.synthetic.images)
    assert torch.equal(first.synthetic.images, _in_process(quick_run, pairs).images)
    # an inversion recorded at other skip levels holds another h: never served from this cache entry
    wider = injector.inject(tr.images, tr.labels, pairs.content, pairs.style, replace(CFG, skip_levels=1), seed=7)
    assert wider.cache["misses"] == 2 * distinct and wider.cache["entries"] == 2 * distinct


def test_actor_equals_in_process_and_fan_out_equals_one_actor(ray_cluster, quick_run):
    pairs = _pairs(quick_run)
    tr = quick_run.ds.train
    expected = _in_process(quick_run, pairs)
    one = [injector_actor(quick_run.dir, threads=1)]
    syn1, evals1 = fan_out(one, tr.images, tr.labels, pairs, CFG, seed=7)
    assert torch.equal(syn1.images, expected.images) and torch.equal(syn1.labels, expected.labels)
    ray_cluster.kill(one[0])  # free its CPU: the cluster has two
    two = [injector_actor(quick_run.dir, threads=1) for _ in range(2)]
    syn2, evals2 = fan_out(two, tr.images, tr.labels, pairs, CFG, seed=7)
    # each actor inverts its own contents: the same pixels up to float rounding of other batch shapes
    assert (syn2.images.int() - expected.images.int()).abs().max() <= 2
    assert torch.equal(syn2.content, expected.content) and torch.equal(syn2.style, expected.style)
    assert evals2 >= evals1
    info = ray_cluster.get(two[0].info.remote())
    assert info["threads"] == 1 and info["cache"]["entries"] > 0
