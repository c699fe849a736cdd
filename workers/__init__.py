"""Ray around the core: batched injection actors, Tune sweeps, the pipeline as a Ray job, and the CLI."""
