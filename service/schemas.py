"""The HTTP edge's request and response models (pydantic).

Every range the service accepts is stated here, so the OpenAPI document carries it; a value outside its range
answers 400 naming the field (ingress.py turns pydantic's range errors into 400), a value of the wrong type 422.
The per-deployment maxima (``max_samples``, ``max_steps``) are checked in ingress.py and patched into the document.
The injection settings' ranges are core's (``InjectionConfig.RANGES``), written once.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffinject.core.injection import InjectionConfig

_RANGES = InjectionConfig.RANGES  # one place for the injection settings' ranges: core's config

MAX_SEED = 2**63 - 1  # seeds are int64 all the way down (numpy SeedSequence, torch generators)
MAX_INDEX = 2**31 - 1
MAX_LIST = 100_000  # list lengths; the body limit (max_body_bytes) usually binds first
Index = Annotated[int, Field(ge=0, le=MAX_INDEX)]


class InlineDataset(BaseModel):
    """A small dataset carried in the request: base64 PNG images (all one size) and their task labels."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1, max_length=MAX_LIST,
                              description="base64-encoded PNG images, all the same size")
    labels: list[Index] = Field(min_length=1, max_length=MAX_LIST,
                                description="task label of each image (never a bias label)")


class InjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str | None = Field(None, max_length=256,
                                description="name of a dataset registered with the service (GET /datasets)")
    inline: InlineDataset | None = Field(None, description="or: a small dataset carried in the request")
    model: str | None = Field(None, max_length=256, description="inline datasets: whose registered dataset's U-Net "
                                                                "to use (default: the first registered)")
    conflict_indices: list[Index] | None = Field(None, min_length=1, max_length=MAX_LIST, description=(
        "content pool (distinct indices into the dataset); omitted: top-K mined with the dataset's biased classifier"))
    k: int | None = Field(None, ge=1, le=MAX_INDEX, description="with mining: samples per class (default: the "
                                                                 "dataset's K; at most its smallest class)")
    style_indices: list[Index] | None = Field(None, min_length=1, max_length=MAX_LIST, description=(
        "style pool (distinct indices; default: every image of another class)"))
    num_samples: int = Field(16, ge=1, le=MAX_LIST, description="synthetic samples to generate (at most the "
                                                                "deployment's max_samples: GET /datasets)")
    # injection settings: omitted, the registered dataset's own (its `injection:` settings), else core's defaults
    gamma: float | None = Field(None, ge=_RANGES["gamma"][0], le=_RANGES["gamma"][1], allow_inf_nan=False,
                                description="injection strength (default: the dataset's)")
    t_edit: int | None = Field(None, ge=_RANGES["t_edit"][0], le=_RANGES["t_edit"][1],
                               description="inject at generation steps with t >= t_edit (default: the dataset's)")
    skip_levels: int | None = Field(None, ge=_RANGES["skip_levels"][0], le=_RANGES["skip_levels"][1], description=(
        "also inject the skip connections of this many of the coarsest up blocks (default: the dataset's)"))
    steps: int | None = Field(None, ge=_RANGES["steps"][0], le=_RANGES["steps"][1], description=(
        "DDIM steps for inversion and generation (default: the dataset's; at most the deployment's max_steps)"))
    seed: int = Field(0, ge=0, le=MAX_SEED, description="same request and seed give the same images")
    format: Literal["json", "zip"] = Field("json", description=(
        "json: base64 PNGs in the body; zip: the image-folder layout ({label}/{name}.png) with manifest.csv, as "
        "`diffinject export` writes it"))


class SyntheticSample(BaseModel):
    image: str = Field(description="base64 PNG")
    label: int
    content: int = Field(description="index of the content image")
    style: int = Field(description="index of the style image")


class InjectResponse(BaseModel):
    dataset: str
    samples: list[SyntheticSample]
    unet_evaluations_per_sample: float
    timings: dict[str, float] = Field(description="seconds: queue+batch wait, injection of the whole batch, total")
    batch_requests: int = Field(description="requests in the batch this one was generated in")


class DatasetInfo(BaseModel):
    name: str
    images: int
    num_classes: int
    image_size: list[int] = Field(description="channels, height, width")
    k: int
    model: str
    injection: dict = Field(description="the dataset's injection settings: what a request's omitted fields take")
    max_samples: int = Field(description="this deployment's limit on num_samples")
    max_steps: int = Field(description="this deployment's limit on steps")


class Problem(BaseModel):
    """Every 4xx/5xx body the service writes itself: the field at fault (or null) and what is wrong."""

    field: str | None
    message: str


class ErrorResponse(BaseModel):
    detail: Problem | list[dict] = Field(description="a Problem, or FastAPI's list of {loc, msg, type} (422)")
