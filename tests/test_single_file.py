"""Single-file checkpoints: a tiny SD 1.x, SD 2.x and SDXL written in the original (LDM / SGM) key layout
load through diffusers' from_single_file into the same weights and images as their diffusers folders."""

import shutil

import numpy as np
import pytest
import torch

from styleinject.families import SD, SDXL, family_of
from styleinject.pipeline import generate, load_pipeline, native_resolution
from styleinject.serving.defaults import generation_defaults, read_generation_defaults
from styleinject.testing import write_single_file

KW = {"seed": 3, "steps": 2, "width": 64, "height": 64, "guidance_scale": 5.0}


def _px(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl"])
def test_single_file_equals_the_diffusers_folder(kind, tiny_pipeline_path, tiny_sd2_path, tiny_sdxl_path, tmp_path):
    from safetensors import safe_open

    folder = {"sd": tiny_pipeline_path, "sd2": tiny_sd2_path, "sdxl": tiny_sdxl_path}[kind]
    file = write_single_file(folder, tmp_path / "model.safetensors")
    with safe_open(str(file), framework="pt") as handle:
        keys = set(handle.keys())
    # the original layout, not diffusers'
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.encoder.norm_out.weight" in keys
    assert not any(k.startswith(("unet.", "down_blocks.")) for k in keys)
    if kind == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    if kind == "sd2":  # OpenCLIP's layout, as in stable-diffusion-2-1's own file
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    ref = load_pipeline(folder, device="cpu")
    got = load_pipeline(file, device="cpu", config=folder)
    assert type(got) is type(ref) and family_of(got) is (SDXL if kind == "sdxl" else SD)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(ref, name, None) is None:
            continue
        want, have = getattr(ref, name).state_dict(), getattr(got, name).state_dict()
        assert want.keys() == have.keys(), name
        assert all(torch.equal(want[k], have[k]) for k in want), name
    assert np.array_equal(_px(generate(got, "a red square", **KW)), _px(generate(ref, "a red square", **KW)))


def test_config_folder_beside_the_file_needs_configs_only(tiny_sdxl_path, tmp_path):
    file = write_single_file(tiny_sdxl_path, tmp_path / "community.safetensors")
    shutil.copytree(tiny_sdxl_path, tmp_path / "community.config", ignore=shutil.ignore_patterns("*.safetensors"))
    pipe = load_pipeline(file, device="cpu")
    assert family_of(pipe) is SDXL
    assert native_resolution(file) == 64
    # the sampling defaults come from the same folder, for the library and for the API's cost estimate
    (tmp_path / "community.config" / "generation_defaults.json").write_text('{"steps": 7}')
    assert generation_defaults(load_pipeline(file, device="cpu"))["steps"] == 7
    assert read_generation_defaults(file) == {"steps": 7}


def test_single_file_errors_name_the_fix(tiny_pipeline_path, tiny_sdxl_path, tmp_path, monkeypatch):
    import huggingface_hub.constants

    file = write_single_file(tiny_pipeline_path, tmp_path / "sd.safetensors")
    # no config anywhere and an empty hugging face cache: refuse rather than download
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"sd\.config \(e\.g\. stable-diffusion-v1-5/.*hf download.*"
                                                r"config=FOLDER.*nothing is downloaded"):
        load_pipeline(file, device="cpu")
    # diffusers takes the tiny SDXL for SD 1.5 (it recognises full-size key names): no wrong hint
    xl_file = write_single_file(tiny_sdxl_path, tmp_path / "xl.safetensors")
    with pytest.raises(FileNotFoundError, match="StableDiffusionXLPipeline checkpoint") as error:
        load_pipeline(xl_file, device="cpu")
    assert "xl.config" in str(error.value) and "stable-diffusion-v1-5" not in str(error.value)
    with pytest.raises(ValueError, match="StableDiffusionPipeline checkpoint but its config folder"):
        load_pipeline(file, device="cpu", config=tiny_sdxl_path)
    with pytest.raises(ValueError, match="diffusers-layout"):
        load_pipeline(tiny_pipeline_path / "unet" / "diffusion_pytorch_model.safetensors", device="cpu")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="never loaded"):
        load_pipeline(pickle, device="cpu")


def test_configs_from_the_hugging_face_cache(tiny_pipeline_path, tmp_path, monkeypatch):
    """No config given: the configs of the hub model diffusers infers for the checkpoint, if that
    model's configs are in the local cache (as `huggingface-cli download --include '*.json'` leaves them)."""
    import huggingface_hub.constants
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint

    file = write_single_file(tiny_pipeline_path, tmp_path / "sd.safetensors")
    repo = fetch_diffusers_config(load_single_file_checkpoint(str(file)))["pretrained_model_name_or_path"]
    cache = tmp_path / "cache" / ("models--" + repo.replace("/", "--"))
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_pipeline_path, cache / "snapshots" / ("0" * 40), ignore=shutil.ignore_patterns("*.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(file, device="cpu")
    assert family_of(pipe) is SD
    assert np.array_equal(_px(generate(pipe, "a cat", **KW)),
                          _px(generate(load_pipeline(tiny_pipeline_path, device="cpu"), "a cat", **KW)))


def test_family_from_checkpoint_keys():
    from styleinject.families import family_of_checkpoint

    unet = "model.diffusion_model.input_blocks.0.0.weight"
    assert family_of_checkpoint([unet, "cond_stage_model.transformer.text_model.final_layer_norm.weight"]) is SD
    assert family_of_checkpoint([unet, "cond_stage_model.model.ln_final.weight"]) is SD  # SD 2.x (OpenCLIP)
    assert family_of_checkpoint([unet, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                                 "conditioner.embedders.1.model.ln_final.weight"]) is SDXL
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        family_of_checkpoint(["lora_unet_down_blocks_0.lora_up.weight"])
