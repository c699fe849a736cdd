"""Ray Serve + FastAPI: the Ingress (``POST /inject``, service/ingress.py) in front of batched Injector replicas
(service/injector.py) over a registry of prepared datasets (service/datasets.py); ``service/app.py`` wires them."""
