"""Synthetic samples out of a run, for the user's own training code: an image folder and its manifest.

    DIR/{label}/{name}.png     the layout torchvision's ImageFolder and the datasets library's imagefolder read
    DIR/manifest.csv           file,label,kind,content,style,gamma,t_edit,skip_levels,steps,seed,unet: how each image
                               was made

``kind`` is ``synthetic`` (content and style are indices into the training split) or ``real`` (``--with-real``: the
training images themselves, so DIR is the debiased training set). The service answers the same layout as a zip
(``POST /inject`` with ``"format": "zip"``): :func:`entries` makes both.
"""

from __future__ import annotations

import csv
import io
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .artifacts import CorruptFile, check, read_json
from .diffusion import weights_id
from .injection import InjectionConfig, Synthetic
from .lock import lock_folder
from .run import saved_config

COLUMNS = ("file", "label", "kind", "content", "style", "gamma", "t_edit", "skip_levels", "steps", "seed", "unet")


def made_by(injection: InjectionConfig, seed: int, unet: str) -> dict:
    """What a manifest row records of how its synthetic sample was made: the injection settings that shape its
    pixels, the seed and the U-Net's weights id."""
    return {"gamma": injection.gamma, "t_edit": injection.t_edit, "skip_levels": injection.skip_levels,
            "steps": injection.steps, "seed": seed, "unet": unet}


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (grey for one channel)."""
    array = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_entries(labels, content, style, pngs, made: dict, classes: list[str] | None = None):
    """``(path, png bytes, manifest row)`` of synthetic samples whose PNGs are encoded already (``made``:
    :func:`made_by`); labels as ``classes`` names them (default: their numbers)."""
    for i, (label, c, s, png) in enumerate(zip(labels, content, style, pngs)):
        name = classes[int(label)] if classes else int(label)
        path = f"{name}/synthetic-{i:06d}.png"
        yield path, png, {"file": path, "label": name, "kind": "synthetic", "content": int(c), "style": int(s), **made}


def entries(syn: Synthetic, made: dict, real: tuple[torch.Tensor, torch.Tensor] | None = None,
            classes: list[str] | None = None):
    """``(path, png bytes, manifest row)`` of every image: the synthetic samples, then the real images if given."""
    yield from synthetic_entries(syn.labels, syn.content, syn.style, map(png_bytes, syn.images), made, classes)
    if real is not None:
        images, labels = real
        for i in range(len(labels)):
            name = classes[int(labels[i])] if classes else int(labels[i])
            path = f"{name}/real-{i:06d}.png"
            yield path, png_bytes(images[i]), {"file": path, "label": name, "kind": "real", "content": i}


def manifest_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def zip_bytes(items) -> bytes:
    """Entries (:func:`entries`, :func:`synthetic_entries`) as the image-folder layout and its manifest in one zip
    (the service's ``"format": "zip"``)."""
    buf, rows = io.BytesIO(), []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # PNGs are compressed already
        for path, data, row in items:
            z.writestr(path, data)
            rows.append(row)
        z.writestr("manifest.csv", manifest_csv(rows))
    return buf.getvalue()


@dataclass
class Exported:
    folder: Path
    synthetic: int
    real: int


def export_run(run_dir: str | Path, to: str | Path, with_real: bool = False, source: str = "synthetic") -> Exported:
    """Write a run's synthetic samples (``run_dir/<source>/samples.pt``) as an image folder with ``manifest.csv``.

    ``with_real`` adds the run's training images (its dataset is loaded as the run's config says). ``to`` must not
    exist or be empty: an export never overwrites."""
    run_dir, to = Path(run_dir), Path(to)
    samples = run_dir / source / "samples.pt"
    if not samples.exists():
        raise FileNotFoundError(f"no synthetic samples at {samples}: finish the run first")
    lock_folder(run_dir)  # no run may be writing the folder while it is read
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise ValueError(f"{to} exists and is not an empty folder: export writes into a new one")
    unet = "unet" if source == "synthetic" else "unet-corpus"
    for stage in (source, unet):  # read only what its manifest vouches for; the run, not export, redoes a stage
        found = check(run_dir, stage)
        if not found.done:
            raise (CorruptFile(run_dir / stage, "; ".join(found.problems) + "; rerun the run's command to redo it")
                   if found.problems else FileNotFoundError(f"the {stage} stage of {run_dir} is not finished: finish "
                                                            "the run first"))
    cfg = saved_config(run_dir)
    made = made_by(cfg.injection, cfg.seed, weights_id(run_dir / unet))
    real = None
    if with_real:
        from .config import dataset_for

        ds = dataset_for(cfg)
        real = (ds.train.images, ds.train.labels)  # task labels only: the bias labels stay behind
    # your own data's class names (data.json), so that the export reads back in as the same classes
    data = run_dir / "data.json"
    classes = read_json(data)["classes"] if cfg.data is not None and check(run_dir, "data").done else None
    syn = Synthetic.load(samples)
    rows = []
    tmp = to.with_name(to.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted export left
    for path, png, row in entries(syn, made, real, classes):
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp / path).write_bytes(png)
        rows.append(row)
    (tmp / "manifest.csv").write_text(manifest_csv(rows))
    if to.exists():
        to.rmdir()
    tmp.replace(to)  # whole or not at all
    return Exported(to, len(syn.labels), 0 if real is None else len(real[1]))
