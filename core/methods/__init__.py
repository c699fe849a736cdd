"""Every debiasing method, one class each behind :class:`~core.methods.base.Method`, registered by name here
(DomainBed's ``algorithms.py``). Each class's ``Params`` dataclass holds its hyperparameters' defaults; a run
overrides them with ``RunConfig.hparams[name]``.

The pipeline, Tune, the benchmarks and ``--methods`` read :data:`REGISTRY`. Adding a method is one new file here
with its class, and one line below.
"""

from __future__ import annotations

from .base import LossEMA, Method, Trained, relative_difficulty
from .denetdm import DeNetDM
from .diffinject import (DeNetDMDiffInject, DiffInject, DiffInjectCorpus, DisEntDiffInject, JTTDiffInject,
                         LfFDiffInject)
from .disent import DisEnt
from .jtt import JTT
from .lff import LfF
from .oracle import Oracle, oracle_samples
from .vanilla import Vanilla

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (
    Vanilla,
    LfF,
    JTT,
    DisEnt,
    DeNetDM,
    DiffInject,
    LfFDiffInject,
    JTTDiffInject,
    DisEntDiffInject,
    DeNetDMDiffInject,
    DiffInjectCorpus,
    Oracle,
)}


def get(name: str, params: dict | None = None) -> Method:
    """The registered method ``name`` with its hyperparameters (defaults overridden by ``params``)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name](params)


__all__ = ["REGISTRY", "get", "Method", "Trained", "LossEMA", "relative_difficulty", "oracle_samples"]
