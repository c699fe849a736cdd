"""The injection job that travels through the Serve handle, from the Ingress to the Injector deployment."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffinject.core.injection import InjectionConfig


@dataclass(frozen=True, eq=False)
class InjectJob:
    """One request's samples: pairs of (content, style) indices into a dataset's images, their seed and settings.

    The Ingress builds it from a request checked against the schema (``schemas.InjectRequest``); the Injector checks
    it again with core's checks (``workers.injector.check_job``: the seed, the pairs against the images, the
    injection settings' ranges), so a job from any handle caller fails alone and names its field.
    """

    model: str  # the registered dataset whose U-Net generates (Serve's multiplexed model id)
    content: np.ndarray  # int64, one index per sample
    style: np.ndarray  # int64, one index per sample
    seed: int
    cfg: InjectionConfig
    dataset: str | None = None  # a registered dataset's training images; None: the inline ``images`` below
    images: torch.Tensor | None = None  # uint8 (N, C, H, W), carried by the request
    labels: torch.Tensor | None = None  # int64 (N,), the inline images' task labels
    images_key: str | None = None  # the inline images' content hash (the injector's cache key)

    @property
    def inline(self) -> bool:
        return self.dataset is None
