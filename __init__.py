"""diffinject: debias image classifiers without bias labels, with synthetic bias-conflict images made by
diffusion h-space injection (DiffInject).

The public API::

    import diffinject

    cfg = diffinject.make_config("quick")              # a preset, plus overrides as a dict
    run = diffinject.Run("runs/quick", cfg)            # one run folder: resumable, one config
    metrics = run.all()                                # mine -> U-Net -> inject -> debias, and the report
    diffinject.export_run("runs/quick", "synthetic/")  # the synthetic images as PNGs and a CSV manifest

``diffinject.inject`` is the injection itself (DDIM inversion and h-space Slerp) for a U-Net and a batch of
pairs; ``diffinject.METHODS`` maps each debiasing method's name to its class.

The subpackages are the repository's folders: ``diffinject.core`` (the algorithm: torch and diffusers, no Ray and
no HTTP), ``diffinject.workers`` (Ray actors, Tune, jobs and the CLI) and ``diffinject.service`` (Ray Serve).
"""

__version__ = "0.2.0"

from .core.config import PRESETS, RunConfig, make_config
from .core.export import export_run
from .core.injection import InjectionConfig, inject
from .core.methods import REGISTRY as METHODS
from .core.run import Run

__all__ = ["__version__", "Run", "RunConfig", "InjectionConfig", "make_config", "PRESETS", "inject", "METHODS",
           "export_run"]
