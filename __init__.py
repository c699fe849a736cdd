"""diffinject: debias image classifiers without bias labels, with synthetic bias-conflict images made by
diffusion h-space injection (DiffInject).

The public API::

    import diffinject

    cfg = diffinject.make_config("quick")              # a preset, plus overrides as a dict
    run = diffinject.Run("runs/quick", cfg)            # one run folder: resumable, one config
    metrics = run.all()                                # mine -> U-Net -> inject -> debias, and the report
    diffinject.export_run("runs/quick", "synthetic/")  # the synthetic images as PNGs and a CSV manifest
    clf = diffinject.load_classifier("runs/quick")     # the debiased classifier, with its class names
    clf.predict(["photo.jpg"])                         # -> ["cat"]

``make_config(overrides={"data": "path/to/images"})`` runs on your own images (core/folders.py: ImageFolder,
Hugging Face imagefolder or a CSV manifest), no bias labels needed.

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
from .core.predict import Classifier, load_classifier
from .core.run import Run

__all__ = ["__version__", "Run", "RunConfig", "InjectionConfig", "make_config", "PRESETS", "inject", "METHODS",
           "export_run", "load_classifier", "Classifier"]
