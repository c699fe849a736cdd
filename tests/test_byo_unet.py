"""Bring your own diffusion model, take your synthetic data out: a U-Net saved by diffusers itself (a DDPMPipeline
folder, no train.json) runs the quick pipeline to the end, ``diffinject export`` writes its samples as an image
folder with a manifest, and what cannot work is refused in one line."""

import csv
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from PIL import Image

from diffinject.core.diffusion import ddim_scheduler, from_model_space, load_unet, to_model_space
from diffinject.core.injection import InjectionConfig, Pairs, inject
from diffinject.workers.cli import main


def _tiny_unet(channels: int = 3, **kw) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, **kw)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A DDPMPipeline written by diffusers' own save_pretrained: unet/ and scheduler/, no train.json."""
    folder = tmp_path_factory.mktemp("ddpm-pipeline")
    DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    assert (folder / "unet" / "config.json").exists() and not (folder / "unet" / "train.json").exists()
    return folder


@pytest.fixture(scope="module")
def byo_run(pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("byo") / "run"
    code = main(["run", "--preset", "quick", "--unet", str(pipeline_dir), "--methods", "vanilla,diffinject",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_a_diffusers_pipeline_folder_runs_the_pipeline_to_the_end(byo_run, pipeline_dir):
    metrics = json.loads((byo_run / "metrics.json").read_text())
    source = metrics["unet_sources"]["diffinject"]
    assert source["origin"] == str(pipeline_dir) and source["bias_knowledge"] is None  # not recorded: from outside
    assert set(metrics["methods"]) == {"vanilla", "diffinject"}
    assert load_unet(byo_run / "unet").config.block_out_channels == [16, 32]  # the given model, not one trained here


def test_export_writes_one_png_per_sample_and_a_matching_manifest(byo_run, tmp_path, capsys):
    from diffinject.core.injection import Synthetic

    syn = Synthetic.load(byo_run / "synthetic" / "samples.pt")
    out = tmp_path / "export"
    assert main(["export", str(byo_run), "--to", str(out)]) == 0
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert {"file", "label", "content", "style", "gamma", "t_edit", "skip_levels", "steps", "seed", "unet"} <= set(rows[0])
    assert len(rows) == len(syn.labels) == len(list(out.glob("*/*.png")))
    for i, row in enumerate(rows):
        image = np.asarray(Image.open(out / row["file"]))
        assert row["file"].split("/")[0] == row["label"] == str(int(syn.labels[i]))
        assert np.array_equal(image, syn.images[i].permute(1, 2, 0).numpy())
        assert int(row["content"]) == int(syn.content[i]) and int(row["style"]) == int(syn.style[i])
    assert main(["export", str(byo_run), "--to", str(out)]) == 2  # never overwrites
    assert "is not an empty folder" in capsys.readouterr().err
    with_real = tmp_path / "with-real"
    assert main(["export", str(byo_run), "--to", str(with_real), "--with-real"]) == 0
    kinds = [r["kind"] for r in csv.DictReader((with_real / "manifest.csv").open())]
    assert kinds.count("synthetic") == len(syn.labels) and kinds.count("real") == 3000


def test_bin_weights_load_as_safetensors_do(tmp_path):
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "st")
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").exists()
    st, binary = load_unet(tmp_path / "st").state_dict(), load_unet(tmp_path / "bin").state_dict()
    assert st.keys() == binary.keys() and all(torch.equal(st[k], binary[k]) for k in st)


@pytest.mark.parametrize("make,words", [
    (lambda d: UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                    layers_per_block=1).save_pretrained(d), "conditional U-Net"),
    (lambda d: _tiny_unet(channels=1).save_pretrained(d), "channel mismatch"),
    (lambda d: _tiny_unet(channels=4).save_pretrained(d), "latent-space model"),
    (lambda d: (_tiny_unet().save_pretrained(d / "unet"), (d / "vae").mkdir()), "latent-space pipeline"),
    (lambda d: d.mkdir(parents=True, exist_ok=True), "no U-Net at"),
])
def test_what_cannot_work_is_one_line_and_exit_2(make, words, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    make(folder)
    code = main(["run", "--preset", "quick", "--unet", str(folder), "--methods", "diffinject",
                 "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "biased").exists()  # refused before any stage ran


@pytest.mark.parametrize("given", [True, False])
def test_skip_levels_the_unet_cannot_take_is_refused_before_any_stage(given, tmp_path, capsys):
    """A given U-Net's up blocks are read from its config, a U-Net to be trained here from the run's diffusion
    settings (the quick preset's: 2 up blocks): 3 is refused at once, not after mining and U-Net training."""
    args = ["run", "--preset", "quick", "--methods", "diffinject", "--skip-levels", "3",
            "--out", str(tmp_path / "run"), "--no-progress"]
    if given:
        _tiny_unet().save_pretrained(tmp_path / "model")
        args += ["--unet", str(tmp_path / "model")]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "--skip-levels 3 must be between 0 and the U-Net's 2 up blocks" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run" / "biased").exists()


def test_grey_images_go_through_an_rgb_model_and_come_back_grey():
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    x = to_model_space(images, 32, channels=3)
    assert x.shape == (4, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    assert torch.equal(from_model_space(x, 28, channels=1), images)
    unet = _tiny_unet().eval()
    syn = inject(unet, ddim_scheduler(), images, torch.tensor([0, 1, 0, 1]),
                 Pairs(np.array([0, 1]), np.array([1, 0])), InjectionConfig(steps=3), progress=False)
    assert syn.images.shape == (2, 1, 28, 28)


def test_the_h_space_is_the_middle_block_whatever_the_depth():
    from diffinject.core.reference import bottleneck_hook

    deep = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8,
                       block_out_channels=(8, 16, 16, 32), down_block_types=("DownBlock2D",) * 4,
                       up_block_types=("UpBlock2D",) * 4).eval()
    seen = {}
    with bottleneck_hook(deep, lambda h: seen.setdefault("h", h)), torch.no_grad():
        deep(torch.randn(1, 3, 32, 32), 10)
    assert seen["h"].shape == (1, 32, 4, 4)  # 32 px halved three times: the bottleneck of a 4-level U-Net


def test_zip_of_the_same_layout(byo_run):
    from diffinject.core.export import entries, zip_bytes
    from diffinject.core.injection import Synthetic

    syn = Synthetic.load(byo_run / "synthetic" / "samples.pt")
    made = {"gamma": 0.9, "t_edit": 300, "skip_levels": 0, "steps": 5, "seed": 0, "unet": "x"}
    z = zipfile.ZipFile(io.BytesIO(zip_bytes(entries(syn, made))))
    rows = list(csv.DictReader(io.StringIO(z.read("manifest.csv").decode())))
    assert sorted(r["file"] for r in rows) == sorted(n for n in z.namelist() if n.endswith(".png"))
