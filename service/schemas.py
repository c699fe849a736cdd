"""The HTTP edge's request and response models (pydantic). Range checks that answer 400 live in app.py."""

from pydantic import BaseModel, ConfigDict, Field

from core.injection import InjectionConfig

_DEFAULTS = InjectionConfig()  # one place for the injection defaults: core's config


class InlineDataset(BaseModel):
    """A small dataset carried in the request: base64 PNG images (all one size) and their task labels."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(description="base64-encoded PNG images, all the same size")
    labels: list[int] = Field(description="task label of each image (never a bias label)")


class InjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str | None = Field(None, description="name of a dataset registered with the service (GET /datasets)")
    inline: InlineDataset | None = Field(None, description="or: a small dataset carried in the request")
    model: str | None = Field(None, description="inline datasets: whose registered dataset's U-Net to use "
                                                "(default: the first registered)")
    conflict_indices: list[int] | None = Field(None, description="content pool (indices into the dataset); "
                                               "omitted: top-K mined with the dataset's biased classifier")
    k: int | None = Field(None, description="with mining: samples per class (default: the dataset's K)")
    style_indices: list[int] | None = Field(None, description="style pool (default: every image of another class)")
    num_samples: int = Field(16, description="synthetic samples to generate")
    gamma: float = Field(_DEFAULTS.gamma, description="injection strength in [0, 1]")
    t_edit: int = Field(_DEFAULTS.t_edit, description="inject at generation steps with t >= t_edit")
    steps: int = Field(_DEFAULTS.steps, description="DDIM steps for inversion and generation")
    seed: int = Field(0, description="same request and seed give the same images")


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
