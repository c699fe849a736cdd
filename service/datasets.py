"""The registry of served datasets inside an Injector replica: each one's record (``workers.prepare``), its training
images and, once a request mines, its biased classifier. It reads the run folders ``diffinject prepare`` made and
writes nothing: a dataset whose folder lacks its U-Net or biased classifier is refused when the replica starts."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from diffinject.core.classifier import load_classifier
from diffinject.core.data import ImageSet
from diffinject.core.mining import mine
from diffinject.core.config import dataset_for, validate
from diffinject.workers.prepare import ServedDataset, missing, served_datasets


class DatasetRegistry:
    """``datasets``: name -> settings (a preset plus ``RunConfig`` overrides), as in the Serve config; ``root``:
    where their run folders are; ``data_root``: the folder that folder datasets' paths resolve into."""

    def __init__(self, datasets: dict, root: str = "runs/serve", data_root: str = "."):
        self.records = served_datasets(datasets, root, data_root)
        lacks = {name: missing(record) for name, record in self.records.items()}
        if any(lacks.values()):
            lines = "; ".join(f"{n} lacks {' and '.join(m)}" for n, m in lacks.items() if m)
            raise ValueError(f"registered datasets are not prepared ({lines}): make them before serving with "
                             "`diffinject prepare deploy/serve.yaml` (or the pipeline as a `ray job submit`, "
                             "deploy/README.md), into the same `root`")
        self._train: dict[str, ImageSet] = {}
        self._num_classes: dict[str, int] = {}
        for name, record in self.records.items():
            cfg = record.config
            ds = dataset_for(cfg)
            validate(cfg, ds)
            self._train[name], self._num_classes[name] = ds.train, ds.num_classes
        self._biased: dict[str, torch.nn.Module] = {}

    def __contains__(self, name) -> bool:
        return name in self.records

    def __getitem__(self, name: str) -> ServedDataset:
        return self.records[name]

    def images(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The dataset's training images and task labels."""
        train = self._train[name]
        return train.images, train.labels

    def describe(self) -> dict:
        """name -> what the Ingress needs to check and pair a request: labels, classes, image size, K, U-Net,
        injection settings."""
        return {name: {"labels": self._train[name].labels.tolist(), "num_classes": self._num_classes[name],
                       "image_size": list(self._train[name].images.shape[1:]), "k": record.config.mining.k,
                       "model": str(record.unet), "injection": asdict(record.config.injection)}
                for name, record in self.records.items()}

    def mine(self, name: str, k: int) -> np.ndarray:
        """Top-K per class by the dataset's biased classifier, filtered as its mining settings say."""
        cfg, train = self.records[name].config, self._train[name]
        if name not in self._biased:
            self._biased[name] = load_classifier(self.records[name].biased, cfg.mining.classifier,
                                                 tuple(train.images.shape[1:]), self._num_classes[name])
        return mine(self._biased[name], train.images, train.labels, k, **cfg.mining.filters).indices
