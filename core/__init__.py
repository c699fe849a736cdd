"""diffinject core: the DiffInject algorithm in plain torch + diffusers (no Ray, no HTTP)."""

__version__ = "0.1.0"
