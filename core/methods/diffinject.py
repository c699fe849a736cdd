"""DiffInject's stage 4: a learner trained on the real training split plus the synthetic bias-conflict samples.

The synthetic samples are data, so they combine with any learner: ``diffinject`` is cross entropy (Vanilla) on real
+ synthetic, the paper's row; ``lff+diffinject``, ``jtt+diffinject``, ``disent+diffinject`` and ``denetdm+diffinject``
learn from the same data with LfF, JTT, DisEnt or DeNetDM.
``diffinject-corpus`` takes its samples from the U-Net pretrained on the embedded Colored MNIST's colour-balanced
corpus, which took knowledge of the bias to build: it is reported as its own row, never as the method.
"""

from __future__ import annotations

from dataclasses import dataclass

from .denetdm import DeNetDM
from .disent import DisEnt
from .jtt import JTT
from .lff import LfF, LfFParams
from .vanilla import Vanilla


class DiffInject(Vanilla):
    name, label, extra = "diffinject", "DiffInject (label-free)", "diffinject"


class DiffInjectCorpus(Vanilla):
    name, label, extra = "diffinject-corpus", "DiffInject, corpus U-Net (uses bias knowledge)", "diffinject-corpus"
    bias_knowledge = True


@dataclass
class LfFDiffInjectParams(LfFParams):
    # uncapped, LfF's difficulty weights pile onto the synthetic samples, which are mostly bias-conflicting by design
    cap_extra_weight: bool = True
    # learning from designed conflicts, the biased model loses the bias whose failures LfF weights by
    biased_learns_extra: bool = False


class LfFDiffInject(LfF):
    name, label, extra, Params = "lff+diffinject", "LfF + DiffInject (label-free)", "diffinject", LfFDiffInjectParams


class JTTDiffInject(JTT):
    name, label, extra = "jtt+diffinject", "JTT + DiffInject (label-free)", "diffinject"


class DisEntDiffInject(DisEnt):
    name, label, extra = "disent+diffinject", "DisEnt + DiffInject (label-free)", "diffinject"


class DeNetDMDiffInject(DeNetDM):
    name, label, extra = "denetdm+diffinject", "DeNetDM + DiffInject (label-free)", "diffinject"
