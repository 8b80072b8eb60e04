"""Training, distillation and DreamBooth on a tiny SDXL (two text encoders, pooled embeddings,
micro-conditioning), 2 steps each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from styleinject import StyleInjectConfig
from styleinject.adapters.io import read_adapter_metadata
from styleinject.families import SDXL
from styleinject.pipeline import generate, load_pipeline
from styleinject.train import TrainConfig, TrainingError, run_training
from tests.train.helpers import image_folder


@pytest.fixture(scope="module")
def xl(tiny_sdxl_path):
    return load_pipeline(tiny_sdxl_path, device="cpu")


@pytest.fixture(scope="module")
def xl_teacher(tmp_path_factory):
    from styleinject.testing import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("xl-teacher") / "pipe", seed=1, kind="sdxl")


def _cfg(kind, base, data, out, **kw):
    return TrainConfig(kind=kind, base_model=str(base), data=str(data), output_dir=str(out), steps=2,
                       checkpoint_every=0, resolution=64, sample_steps=2, learning_rate=1e-2,
                       adapter=StyleInjectConfig(rank=4, num_styles=2), **kw)


def _changes(pipe, out) -> float:
    kw = {"seed": 0, "steps": 2, "width": 64, "height": 64}
    base = np.asarray(generate(pipe, "a red photo", **kw)[0], dtype=np.float32)
    adapted = np.asarray(generate(pipe, "a red photo", adapter=str(out), **kw)[0], dtype=np.float32)
    return float(np.abs(adapted - base).mean())


def test_sdxl_training_conditioning_matches_the_sdxl_training_recipe(xl):
    """Both encoders' penultimate hidden states concatenated, the second's projected pooled output,
    time ids (h, w, 0, 0, h, w): what diffusers' train_text_to_image_sdxl.py feeds the UNet."""
    prompts = ["a cat", "a red dog"]
    hidden, pooled = [], None
    for tok, enc in ((xl.tokenizer, xl.text_encoder), (xl.tokenizer_2, xl.text_encoder_2)):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    cond = SDXL.encode_prompts(xl, prompts, "cpu", (64, 48))
    assert torch.equal(cond.hidden, torch.cat(hidden, dim=-1))
    assert torch.equal(cond.added["text_embeds"], pooled)
    assert cond.added["time_ids"].tolist() == [[64, 48, 0, 0, 64, 48]] * 2
    assert set(cond.unet_kwargs()) == {"encoder_hidden_states", "added_cond_kwargs"}


def test_sdxl_finetune_distill_dreambooth(tmp_path, tiny_sdxl_path, xl_teacher, xl):
    data = image_folder(tmp_path / "data", n=2)
    progress = []
    run_training(_cfg("finetune", tiny_sdxl_path, data, tmp_path / "ft"), progress=progress.append)
    assert len(progress) == 2 and all(np.isfinite(p.loss) for p in progress)
    distill = []
    run_training(_cfg("distill", tiny_sdxl_path, data, tmp_path / "kd", teacher_model=str(xl_teacher),
                      feat_kd_blocks=["down_blocks.1", "mid_block"]), progress=distill.append)
    assert sorted(distill[-1].terms) == ["loss_feat_kd", "loss_out_kd"]
    inst = image_folder(tmp_path / "inst", n=1, captions=False)
    run_training(_cfg("dreambooth", tiny_sdxl_path, inst, tmp_path / "db", instance_prompt="a photo of sks thing",
                      class_prompt="a photo of a thing", num_class_images=1, prior_loss_weight=1.0))
    assert (tmp_path / "db" / "class_images" / "class-00000.png").is_file()
    for out, kind in (("ft", "finetune"), ("kd", "distill"), ("db", "dreambooth")):
        assert read_adapter_metadata(tmp_path / out)["kind"] == kind
        assert _changes(xl, tmp_path / out) > 0.1, out


def test_distill_refuses_a_teacher_of_another_family(tmp_path, tiny_sdxl_path, tiny_pipeline_path):
    data = image_folder(tmp_path / "data", n=1)
    with pytest.raises(TrainingError, match="one family"):
        run_training(_cfg("distill", tiny_sdxl_path, data, tmp_path / "kd", teacher_model=str(tiny_pipeline_path)))
