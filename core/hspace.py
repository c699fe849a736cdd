"""h-space: the U-Net's forward with its bottleneck h passed out and a replacement h' passed in.

:func:`forward` is ``UNet2DModel.forward`` (diffusers 0.42) written out block by block: it returns the U-Net's
output and h, and takes h' for the way up. It holds no hooks and no module state, so ``torch.compile`` takes it
whole. :class:`HSpace` is one U-Net prepared for many such calls: at a precision (a bf16 copy of its weights, cast
once), compiled or not, each call counted into the :class:`Evaluations` it is handed.

h is the middle block's output (the paper's h-space). With ``skip_levels`` N > 0 it also holds the skip
connections that the N coarsest up blocks read, each flattened per image and concatenated to ``(B, D)``: an
h-space that also carries the coarse layout the skips take past the bottleneck.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Union

import torch
from diffusers import UNet2DModel


class SettingError(ValueError):
    """A setting outside its range; ``field`` names it (the CLI prints the message, the service answers 400 naming
    the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISION_CHOICES = (*PRECISIONS, "auto")


def has_bf16(device: str) -> bool:
    """Whether the device has bf16 arithmetic: CUDA, or a CPU with avx512_bf16 or amx_bf16 (Linux's flags)."""
    if torch.device(device).type == "cuda":
        return True
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """``"auto"``: bf16 on a CPU with bf16 arithmetic (where it is much faster and gives the same results), fp32
    elsewhere (a GPU's calls at these sizes are bound by kernel launches, not arithmetic); any other value as is."""
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cpu" and has_bf16(device) else "fp32"


def check_skip_levels(skip_levels: int, up_blocks: int) -> None:
    """:class:`SettingError` when ``skip_levels`` exceeds a U-Net's ``up_blocks``: a setting this U-Net cannot take
    (``InjectionConfig.RANGES`` knows no U-Net)."""
    if not 0 <= skip_levels <= up_blocks:
        raise SettingError("skip_levels", f"skip_levels {skip_levels} must be between 0 and the U-Net's "
                                          f"{up_blocks} up blocks")


# ---------------------------------------------------------------------------------------------------------
# the forward
# ---------------------------------------------------------------------------------------------------------


class HOutput(NamedTuple):
    """What :func:`forward` returns: the U-Net's output and h as the middle block (and the skips) made it."""

    eps: torch.Tensor
    h: torch.Tensor


HReplace = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], None]


def forward(unet: UNet2DModel, sample: torch.Tensor, timestep, h_replace: HReplace = None, copies: int = 1,
            class_labels=None, skip_levels: int = 0) -> HOutput:
    """``UNet2DModel.forward`` with h passed out and ``h_replace`` passed in.

    ``h_replace`` replaces h on the way up: a tensor, or a function ``h -> h'``; None keeps it. At ``skip_levels``
    N > 0 h is the wide ``(B, D)`` one (module docstring) and a replacement replaces all of its parts.
    ``copies`` > 1 says ``sample`` (and a per-row ``timestep`` or ``class_labels``) is that many equal copies of
    one batch, ``torch.cat([x] * copies)``: the time embedding, the down path and the middle block then run once,
    on the first copy (h has its rows), and the up path runs on every copy, with the skips and the embedding
    repeated, so ``h_replace`` must give ``copies`` times h's rows. An injection step uses this: both halves of
    its doubled batch have the same input and differ only in h.
    """
    cfg = unet.config
    n = sample.shape[0] // copies
    x = sample[:n] if copies > 1 else sample
    if cfg.center_input_sample:
        x = 2 * x - 1.0
    # 1. time (and class) embedding
    timesteps = _rows(timestep, n, copies)
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=x.device)
    elif timesteps.dim() == 0:
        timesteps = timesteps[None].to(x.device)
    timesteps = timesteps * torch.ones(n, dtype=timesteps.dtype, device=timesteps.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    class_labels = _rows(class_labels, n, copies)
    if unet.class_embedding is not None:
        if class_labels is None:
            raise ValueError("class_labels should be provided when doing class conditioning")
        if cfg.class_embed_type == "timestep":
            class_labels = unet.time_proj(class_labels)
        emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
    elif class_labels is not None:
        raise ValueError("class_embedding needs to be initialized in order to use class conditioning")
    # 2. in, 3. down, 4. middle: once
    skip = x
    x = unet.conv_in(x)
    res = (x,)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            x, block_res, skip = block(hidden_states=x, temb=emb, skip_sample=skip)
        else:
            x, block_res = block(hidden_states=x, temb=emb)
        res += block_res
    h = unet.mid_block(x, emb) if unet.mid_block is not None else x
    check_skip_levels(skip_levels, len(unet.up_blocks))
    k = sum(len(block.resnets) for block in unet.up_blocks[:skip_levels])  # the skips those up blocks read
    parts = (h, *res[len(res) - k :])
    h = _flat(parts) if k else h
    # 5. up: on every copy
    if copies > 1:
        emb = torch.cat([emb] * copies)
        res = tuple(torch.cat([r] * copies) for r in res)
        timesteps = torch.cat([timesteps] * copies)
    if h_replace is None:
        x = torch.cat([parts[0]] * copies) if copies > 1 else parts[0]
    else:
        new = h_replace if torch.is_tensor(h_replace) else h_replace(h)
        x, *skips = _unflat(new, parts) if k else (new,)
        res = res[: len(res) - k] + tuple(skips)
    skip = None
    for block in unet.up_blocks:
        block_res, res = res[-len(block.resnets) :], res[: -len(block.resnets)]
        if hasattr(block, "skip_conv"):
            x, skip = block(x, block_res, emb, skip)
        else:
            x = block(x, block_res, emb)
    # 6. out
    x = unet.conv_out(unet.conv_act(unet.conv_norm_out(x)))
    if skip is not None:
        x += skip
    if cfg.time_embedding_type == "fourier":
        x = x / timesteps.reshape((x.shape[0], *([1] * len(x.shape[1:]))))
    return HOutput(x, h)


def _rows(value, rows: int, copies: int):
    """A per-row tensor of a batch of ``copies`` equal copies cut to the first copy; anything else unchanged."""
    if copies > 1 and torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows * copies:
        return value[:rows]
    return value


def _flat(parts) -> torch.Tensor:
    """Tensors of equal rows as one ``(rows, D)`` tensor: each flattened per row, concatenated."""
    return torch.cat([p.flatten(1) for p in parts], dim=1)


def _unflat(flat: torch.Tensor, like) -> list[torch.Tensor]:
    """:func:`_flat` undone: ``flat``'s columns cut into tensors shaped as ``like``'s (any number of rows)."""
    sizes = [p[0].numel() for p in like]
    return [c.reshape(len(flat), *p.shape[1:]) for c, p in zip(flat.split(sizes, dim=1), like)]


# ---------------------------------------------------------------------------------------------------------
# counting, precision and compile
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Evaluations:
    """U-Net evaluations, one per image per call (a doubled injection batch counts twice), and calls.

    Images are what a CPU pays for; calls are what a GPU pays for at small batch sizes (each call launches the
    same kernels). ``shared`` counts the images of calls on ``copies`` of a batch whose time embedding, down path
    and middle block another copy's ran (:func:`forward`): an evaluation costs them only the up path.
    """

    images: int = 0
    calls: int = 0
    shared: int = 0

    def add(self, rows: int, copies: int = 1) -> None:
        self.images += rows
        self.shared += rows - rows // copies
        self.calls += 1


class HSpace:
    """One U-Net ready for many :func:`forward` calls, at ``precision`` ("fp32" or "bf16"; None: its own dtype),
    compiled or not.

    ``model`` is ``unet`` itself in its own precision, else a copy with its weights cast once. With ``compile`` it
    is always a copy, and the calls go through ``torch.compile(forward, fullgraph=True, dynamic=False)`` with
    inductor's ``freezing`` (weights as constants, which lets oneDNN prepack them and fuse GroupNorm and SiLU around
    them): one static graph per kind of call and batch shape, compiled on first use, so the caller pads its calls
    to fixed shapes (``inject``'s ``bucket``). Keep the object to cast and compile once (an actor serving many
    requests does); a copy does not follow later writes to ``unet``'s weights, which :meth:`stale` tells.
    """

    def __init__(self, unet: UNet2DModel, precision: str | None = None, compile: bool = False):
        dtype = unet.dtype if precision is None else PRECISIONS[precision]
        self.unet, self.compiled = unet, compile
        self.precision = {d: name for name, d in PRECISIONS.items()}.get(dtype, str(dtype))
        if dtype == unet.dtype and not compile:
            self.model, self._versions = unet, None
        else:
            # nn.Module.to: diffusers' own `to` warns about modules to keep in float32, which this U-Net has none of
            self.model, self._versions = torch.nn.Module.to(copy.deepcopy(unet), dtype), _versions(unet)
        self._forward = forward
        if compile:
            # static shapes: the caller pads every call to its batch size, so each kind of call is one graph
            self._forward = torch.compile(forward, fullgraph=True, dynamic=False, options={"freezing": True})

    @classmethod
    def of(cls, unet: UNet2DModel | HSpace) -> HSpace:
        """``unet`` if it is an HSpace already, else one of it in its own precision, uncompiled."""
        return unet if isinstance(unet, HSpace) else cls(unet)

    def stale(self) -> bool:
        """Whether ``unet``'s weights were written since the copy was made (their in-place version counters)."""
        return self._versions is not None and _versions(self.unet) != self._versions

    def __call__(self, sample: torch.Tensor, t: int, h_replace: HReplace = None, copies: int = 1,
                 skip_levels: int = 0, evaluations: Evaluations | None = None) -> HOutput:
        """:func:`forward` on ``model`` at timestep ``t``, counted into ``evaluations``; eps and h in ``sample``'s
        dtype. A lower-precision model gets ``sample`` and a tensor h' cast to its dtype, and a function h' sees h
        in ``sample``'s dtype: the Slerp stays in float32."""
        if evaluations is not None:
            evaluations.add(int(sample.shape[0]), copies)
        timestep = torch.tensor([t], dtype=torch.long, device=sample.device)  # a tensor: one compiled graph for every t
        dtype, model = sample.dtype, self.model
        if model.dtype != dtype:
            sample = sample.to(model.dtype)
            if torch.is_tensor(h_replace):
                h_replace = h_replace.to(model.dtype)
            elif h_replace is not None:
                h_replace = functools.partial(_replace_in, h_replace, dtype)
        quiet = contextlib.nullcontext()
        if self.compiled:
            if not sample.is_inference() and torch.is_inference_mode_enabled():
                sample = sample.clone()  # an inference tensor, as every later call's: one graph for both
            quiet = _quiet_compiler()
        with quiet:
            eps, h = self._forward(model, sample, timestep, h_replace, copies, skip_levels=skip_levels)
        return HOutput(eps.to(dtype), h.to(dtype))


def _versions(unet: UNet2DModel) -> tuple[int, ...]:
    return tuple(p._version for p in unet.parameters())


def _replace_in(fn, dtype, h):
    return fn(h.to(dtype)).to(h.dtype)


@contextlib.contextmanager
def _quiet_compiler():
    """Without the compiler's notes on diffusers' code (a screenful per graph, about its own version checks)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
        yield
