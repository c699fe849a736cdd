"""DiffInject's stage 4: a learner trained on the real training split plus the synthetic bias-conflict samples.

The synthetic samples are data, so they combine with any learner: ``diffinject`` is cross entropy (Vanilla) on real
+ synthetic, the paper's row; ``lff+diffinject``, ``jtt+diffinject`` and ``disent+diffinject`` reweight the same data
with LfF, JTT or DisEnt.
``diffinject-corpus`` takes its samples from the U-Net pretrained on the embedded Colored MNIST's colour-balanced
corpus, which took knowledge of the bias to build: it is reported as its own row, never as the method.
"""

from __future__ import annotations

from dataclasses import dataclass

from .disent import DisEnt, DisEntParams
from .jtt import JTT, JTTParams
from .lff import LfF, LfFParams
from .vanilla import Vanilla


@dataclass
class SyntheticParams:
    """What every learner on real + synthetic data may set about the synthetic samples."""

    # a label-free method trained on the real split alone (e.g. "lff"): only the synthetic samples its classifier
    # assigns to their label are learnt from (Run.vetted). None: all of them
    vetted_by: str | None = None

    def __post_init__(self):
        from . import REGISTRY  # here, not at the top: the registry imports this module

        vetter = REGISTRY.get(self.vetted_by) if self.vetted_by is not None else None
        if self.vetted_by is not None and (vetter is None or vetter.extra is not None or vetter.bias_knowledge):
            names = [n for n, m in REGISTRY.items() if m.extra is None and not m.bias_knowledge]
            raise ValueError(f"vetted_by must name a method trained on the real split alone, without bias knowledge "
                             f"({', '.join(names)}); got {self.vetted_by!r}")


class DiffInject(Vanilla):
    name, label, extra, Params = "diffinject", "DiffInject (label-free)", "diffinject", SyntheticParams


class DiffInjectCorpus(Vanilla):
    name, label, extra = "diffinject-corpus", "DiffInject, corpus U-Net (uses bias knowledge)", "diffinject-corpus"
    bias_knowledge = True


@dataclass
class LfFDiffInjectParams(LfFParams, SyntheticParams):
    # Uncapped, LfF gave 87 % of its weight to the synthetic samples (23 % of the data) at 5 %; capped, +5.5 / +5.0
    # points at 5 % on Colored / Corrupted MNIST, level at 0.5-1 % (benchmarks/results/experiments.md, 2026-12-03)
    cap_extra_weight: bool = True

    def __post_init__(self):  # both checks (the MRO would run LfF's alone)
        LfFParams.__post_init__(self)
        SyntheticParams.__post_init__(self)


class LfFDiffInject(LfF):
    name, label, extra, Params = "lff+diffinject", "LfF + DiffInject (label-free)", "diffinject", LfFDiffInjectParams


@dataclass
class JTTDiffInjectParams(JTTParams, SyntheticParams):
    def __post_init__(self):  # both checks (the MRO would run JTT's alone)
        JTTParams.__post_init__(self)
        SyntheticParams.__post_init__(self)


class JTTDiffInject(JTT):
    name, label, extra, Params = "jtt+diffinject", "JTT + DiffInject (label-free)", "diffinject", JTTDiffInjectParams


@dataclass
class DisEntDiffInjectParams(DisEntParams, SyntheticParams):
    pass


class DisEntDiffInject(DisEnt):
    name, label, extra = "disent+diffinject", "DisEnt + DiffInject (label-free)", "diffinject"
    Params = DisEntDiffInjectParams
