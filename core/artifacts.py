"""Every file a run writes is whole or absent, and every stage is done only when its manifest says so.

Writing: :func:`write_atomic` writes to a temporary file beside the target, flushes and syncs it, renames it over
the target and syncs the folder, so a reader (or a rerun after a kill, a full disk or a power cut) finds the old
file or the new one, never part of one. The savers below (JSON, text, torch, PNG, figures, diffusers folders) all
go through it. A writer that fails leaves no temporary file; a full disk surfaces as ``OSError(ENOSPC)`` naming
the file, whichever library was writing.

Sealing: a stage ends by :func:`seal`, which writes ``manifests/<stage>.json`` last, listing each of the stage's
files with its size and SHA-256. :func:`check` reads it back: no manifest means the stage is not done (whatever
files lie about); a file that no longer matches it is named, and the caller redoes the stage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

MANIFESTS = "manifests"  # the folder of a run's stage manifests


class CorruptFile(Exception):
    """A file that exists but cannot be read as what it should be (cut short, overwritten, not ours); ``path``
    names it."""

    def __init__(self, path: str | Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path = Path(path)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(e: BaseException) -> bool:
    """Whether a writer's failure was a full disk: an ``OSError`` says so by errno, torch's and safetensors'
    native writers only in their message."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "unexpected pos" in text


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temporary file in the same folder, which is flushed,
    synced and renamed over ``path``. On any failure (Ctrl-C included) the temporary file is removed and ``path``
    is as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _disk_full(e) and not isinstance(e, OSError):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        if isinstance(e, OSError) and e.filename is None:  # Python's file writes do not name the file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    _sync_folder(path.parent)


def save_bytes(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def save_text(path: str | Path, text: str) -> None:
    save_bytes(path, text.encode())


def save_json(path: str | Path, obj) -> None:
    save_text(path, json.dumps(obj, indent=1) + "\n")


def save_torch(path: str | Path, obj) -> None:
    """``torch.save`` of ``obj``, whole or not at all."""
    write_atomic(path, lambda f: torch.save(obj, f))


def save_image(path: str | Path, image) -> None:
    """A PIL image as PNG."""
    write_atomic(path, lambda f: image.save(f, format="PNG"))


def save_figure(path: str | Path, fig) -> None:
    """A matplotlib figure as PNG."""
    write_atomic(path, lambda f: fig.savefig(f, format="png"))


def save_folder(out: str | Path, write: Callable[[Path], None]) -> None:
    """Files that a library writes into a folder itself (``save_pretrained``): ``write(folder)`` fills a temporary
    folder beside ``out``, then each file is moved into ``out`` whole (:func:`write_atomic`'s guarantee, file by
    file). Files of ``out`` that ``write`` does not make are left alone."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        try:
            write(Path(tmp))
        except Exception as e:
            if _disk_full(e) and not isinstance(e, OSError):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from e
            raise
        for src in sorted(Path(tmp).rglob("*")):
            if src.is_file():
                dst = out / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(src, dst)
    _sync_folder(out)


def load_torch(path: str | Path, device: str = "cpu", weights_only: bool = True):
    """What :func:`save_torch` wrote, on ``device`` whatever device saved it (a run folder made on a GPU resumes on
    a CPU); tensors only unless ``weights_only`` is False (a checkpoint of our own with its settings). A file that
    is there but unreadable raises :class:`CorruptFile` naming it."""
    try:
        return torch.load(path, map_location=device, weights_only=weights_only)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - cut short, not a torch file, not tensors: torch raises many kinds
        raise CorruptFile(path, f"unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None


def read_checkpoint(path: str | Path, device: str = "cpu", weights_only: bool = True) -> dict:
    """A stage's own checkpoint, or ``{}`` when there is none to resume from: absent, or unreadable (then said in one
    line on stderr, and the stage starts over, to the same result)."""
    if not Path(path).exists():
        return {}
    try:
        return load_torch(path, device, weights_only)
    except CorruptFile as e:
        print(f"diffinject: {e}: starting its stage over", file=sys.stderr, flush=True)
        return {}


def read_json(path: str | Path):
    """A JSON file we wrote; :class:`CorruptFile` naming it when it is there but not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFile(path, f"unreadable (not JSON: {e})") from None


# ---------------------------------------------------------------------------------------------------------
# stage manifests
# ---------------------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(folder: str | Path, stage: str) -> Path:
    return Path(folder) / MANIFESTS / f"{stage}.json"


def seal(folder: str | Path, stage: str, files) -> None:
    """Mark ``stage`` of the run in ``folder`` done: ``manifests/<stage>.json``, written last, lists each of
    ``files`` (paths relative to ``folder``) with its size and SHA-256."""
    folder = Path(folder)
    listed = {str(rel): {"bytes": (folder / rel).stat().st_size, "sha256": sha256(folder / rel)} for rel in files}
    manifest_path(folder, stage).parent.mkdir(exist_ok=True)
    save_json(manifest_path(folder, stage), {"stage": stage, "files": listed})


def unseal(folder: str | Path, stage: str) -> None:
    manifest_path(folder, stage).unlink(missing_ok=True)


@dataclass(frozen=True)
class Check:
    """What :func:`check` found: whether the stage was sealed, and each sealed file that no longer matches."""

    sealed: bool
    problems: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return self.sealed and not self.problems


def check(folder: str | Path, stage: str) -> Check:
    """Whether ``stage`` of the run in ``folder`` is done and whole: its manifest exists and every file it lists
    has the size and SHA-256 it lists. Each mismatch is one line naming the file."""
    path = manifest_path(folder, stage)
    if not path.exists():
        return Check(False)
    try:
        listed = read_json(path)["files"]
        listed = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in listed.items()}
    except (CorruptFile, KeyError, TypeError, ValueError, AttributeError):
        return Check(True, (f"{path} is unreadable",))
    problems = []
    for rel, (size, digest) in listed.items():
        file = Path(folder) / rel
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{file} has {file.stat().st_size} bytes, its manifest {size}")
        elif sha256(file) != digest:
            problems.append(f"{file} differs from its manifest (SHA-256)")
    return Check(True, tuple(problems))


def folder_files(folder: str | Path, sub: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file under ``folder/sub`` but those named in ``skip``, relative to ``folder``, sorted: a stage's
    files when the stage owns its folder (a U-Net's)."""
    base = Path(folder)
    return sorted(str(p.relative_to(base)) for p in (base / sub).rglob("*") if p.is_file() and p.name not in skip)


__all__ = ["CorruptFile", "write_atomic", "save_bytes", "save_text", "save_json", "save_torch", "save_image",
           "save_figure", "save_folder", "load_torch", "read_checkpoint", "read_json", "seal", "unseal", "check", "Check",
           "folder_files", "MANIFESTS"]
