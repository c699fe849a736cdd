"""The DiffInject algorithm in plain torch and diffusers: no Ray, no HTTP."""
