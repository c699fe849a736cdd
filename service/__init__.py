"""Ray Serve + FastAPI: the ingress (``POST /inject``) in front of batched injector replicas."""
