"""Ray Serve + FastAPI ingress (``POST /inject``). Not written yet: see the Ray issue."""
