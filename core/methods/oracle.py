"""The oracle ceiling: cross entropy on the training split plus *real* digits redrawn with another class's bias
value, as many as the synthetic rows get. It uses bias knowledge and is reported only as a ceiling."""

from __future__ import annotations

import numpy as np
import torch

from .vanilla import Vanilla


class Oracle(Vanilla):
    name, label, extra = "oracle", "Oracle ceiling (uses bias labels)", "oracle"
    bias_knowledge = True


def oracle_samples(dataset: str, train, count: int, seed: int):
    """``count`` real training digits redrawn with the bias value of another class (the embedded benchmarks only:
    a colour on Colored MNIST, a corruption on Corrupted MNIST).

    Uses the benchmark's bias function, i.e. bias knowledge: for the ceiling row only.
    """
    from ..data import EMBEDDED

    if "grey" not in train.extras or dataset not in EMBEDDED:
        raise ValueError("the oracle ceiling needs an embedded benchmark (its grey digits and bias function)")
    rng = np.random.default_rng([seed, 7])
    idx = rng.choice(len(train.labels), size=count, replace=count > len(train.labels))
    labels = train.labels[idx].numpy()
    bias = (labels + rng.integers(1, 10, size=count)) % 10
    images = EMBEDDED[dataset](train.extras["grey"][idx, 0].numpy(), bias, rng)
    return torch.from_numpy(images), torch.from_numpy(labels)
