"""What a served dataset needs before the service starts, made by ``diffinject prepare`` (never inside a replica).

A Serve config registers datasets by name (``args.datasets``: a preset plus ``RunConfig`` overrides). Each one
becomes a :class:`ServedDataset`, a light frozen record of its run folder, settings and model files;
:func:`prepare` trains (or copies) its U-Net and trains its biased classifier there, and :func:`missing` says what
a folder still lacks. The service reads these records and the files they name; it builds no run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from diffinject.core.artifacts import check
from diffinject.core.config import RunConfig, SHIPPED, make_config
from diffinject.core.run import Run

SERVICE_APP = "diffinject.service.app:build_app"  # the import_path of the service in a Serve config


@dataclass(frozen=True)
class ServedDataset:
    """One registered dataset: its name, run folder, settings, and the files the service reads from the folder."""

    name: str
    folder: Path
    config: RunConfig  # read-only: the dataset's settings, file settings already resolved

    @property
    def unet(self) -> Path:
        """The U-Net folder the injector loads (Serve's multiplexed model of this dataset)."""
        return self.folder / "unet"

    @property
    def biased(self) -> Path:
        """The biased classifier that mines the dataset's bias-conflicting samples."""
        return self.folder / "biased" / "model.pt"


def check_relative(value: str, what: str) -> None:
    """Settings that name files (a dataset's ``data``, ``attributes``, ``data_root``, its ``unet``) must stay under
    the service's folders:
    an absolute path or a ``..`` is refused, whatever it resolves to."""
    path = PurePosixPath(str(value).replace("\\", "/"))
    if path.is_absolute() or Path(str(value)).is_absolute() or ".." in path.parts:
        raise ValueError(f"{what} {value!r} must be a relative path without '..'")


def served_datasets(datasets: dict, root: str = "runs/serve", data_root: str = ".") -> dict[str, ServedDataset]:
    """The record of every registered dataset (``name -> settings``), its run folder ``root/name``.

    A dataset's file settings (``data``, ``attributes``, ``data_root``, ``unet``) must be relative without ``..``;
    data (your own images in any layout core.folders reads, or a released benchmark) resolves inside ``data_root``.
    Reads and writes no file."""
    if not datasets:
        raise ValueError("the service needs at least one registered dataset (args.datasets)")
    base = Path(data_root).resolve()
    records = {}
    for name, spec in datasets.items():
        spec = dict(spec or {})
        cfg = make_config(spec.pop("preset", "default"), spec)
        for key in ("data", "attributes", "data_root", "unet"):
            if getattr(cfg, key) not in (None, SHIPPED):
                check_relative(getattr(cfg, key), f"dataset {name!r}: {key}")
        for key in ("data", "attributes", "data_root"):
            if getattr(cfg, key) is not None:
                setattr(cfg, key, str((base / getattr(cfg, key)).resolve()))
        records[name] = ServedDataset(name, Path(root) / name, cfg)
    return records


def registered_in(config: dict, where: str = "the Serve config") -> list[ServedDataset]:
    """The datasets of every application of a Serve config (a plain dict) that runs the DiffInject service."""
    apps = [a for a in config.get("applications", []) or []
            if str(a.get("import_path", "")).replace(":", ".") == SERVICE_APP.replace(":", ".")]
    if not apps:
        raise ValueError(f"{where} has no application with import_path {SERVICE_APP}")
    records = []
    for app in apps:
        args = app.get("args") or {}
        records += served_datasets(args.get("datasets") or {}, args.get("root", "runs/serve"),
                                   args.get("data_root", ".")).values()
    return records


def missing(record: ServedDataset) -> list[str]:
    """What the dataset's run folder lacks before it can be served: its U-Net and its biased classifier, each a
    finished stage whose files match its manifest (core.artifacts)."""
    lacks = []
    for stage, what in (("unet", f"a trained U-Net in {record.unet}"), ("biased", f"the biased classifier {record.biased}")):
        found = check(record.folder, stage)
        if not found.done:
            lacks.append(what + (f" ({'; '.join(found.problems)}: `diffinject prepare` redoes it)" if found.problems
                                 else ""))
    return lacks


def prepare(record: ServedDataset, progress: bool = True) -> ServedDataset:
    """The dataset's U-Net (copied from a shipped or given folder, else trained, resuming) and biased classifier,
    made in its run folder; a folder made by other settings is refused."""
    run = Run(record.folder, record.config, progress=progress)
    run.unet_dir()
    run.biased()
    return record
