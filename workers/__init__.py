"""Ray actors and jobs around ``core`` (batched injection actors, Tune sweeps, the pipeline as a Ray job).

Not written yet: see the Ray issue. ``core`` runs without Ray.
"""
