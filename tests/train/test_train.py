"""The training loop on the tiny pipeline: every kind, LoRA, resume, cancel, checkpoints, overfitting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from styleinject import StyleInjectConfig, load_adapter
from styleinject.adapters.io import read_adapter_metadata
from styleinject.pipeline import generate, load_pipeline
from styleinject.train import TrainingError, run_training
from styleinject.train.checkpoint import latest_checkpoint, list_checkpoints
from styleinject.train.data import preprocess_image
from styleinject.train.loop import diffusion_loss, diffusion_target
from tests.train.helpers import image_folder

PROMPT = "a red photo number 0"


def pixel_change(pipe, adapter_dir) -> float:
    """Mean absolute pixel difference between the base image and the adapted one (2 steps, 64x64)."""
    kwargs = {"seed": 0, "steps": 2, "width": 64, "height": 64}
    base = np.asarray(generate(pipe, PROMPT, **kwargs)[0], dtype=np.float32)
    adapted = np.asarray(generate(pipe, PROMPT, adapter=str(adapter_dir), **kwargs)[0], dtype=np.float32)
    again = np.asarray(generate(pipe, PROMPT, **kwargs)[0], dtype=np.float32)
    assert np.array_equal(base, again)  # the adapter does not leak into the base model's images
    return float(np.abs(base - adapted).mean())


def test_finetune_smoke_outputs_checkpoints_and_validation(tmp_path, make_cfg, tiny_pipe, tiny_pipeline_path):
    data = image_folder(tmp_path / "data", n=2)
    seen = []
    cfg = make_cfg(data=data, steps=3, learning_rate=1e-2, checkpoint_every=2, keep_checkpoints=1,
                   validation_every=2, validation_prompts=["a red photo"])
    result = run_training(cfg, progress=seen.append)
    out = tmp_path / "out"
    assert (result.steps_done, result.cancelled) == (3, False)
    assert [p.step for p in seen] == [1, 2, 3] and all(p.total == 3 for p in seen)
    assert all(np.isfinite(p.loss) and p.lr == 1e-2 and p.samples_per_s > 0 for p in seen)
    assert seen[-1].eta_s == 0
    # the output folder is an adapter with training metadata
    meta = read_adapter_metadata(out)
    assert meta["kind"] == "finetune" and meta["steps"] == "3" and meta["seed"] == "0"
    assert meta["base_model"] == str(tiny_pipeline_path) and len(meta["data_sha256"]) == 64
    assert meta["adapter_variant"] == "styleinject"
    # keep_checkpoints=1: only the newest survives; a checkpoint is an adapter + state, no pickles
    assert [p.name for p in list_checkpoints(out)] == ["step-000003"]
    files = sorted(p.name for p in (out / "checkpoints" / "step-000003").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "optimizer.json",
                     "optimizer.safetensors", "rng_0.safetensors", "training_state.json"]
    state = json.loads((out / "checkpoints" / "step-000003" / "training_state.json").read_text())
    assert state["step"] == 3 and state["data_order"]["pos"] == 1 and state["data_order"]["epoch"] == 1
    assert (out / "validation" / "step-000002" / "samples.png").is_file()
    assert not (out / ".work").exists()
    # trained adapter tensors are all there and not all zero; generation changes
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert any("si_router_weight" in k for k in tensors) and any("si_G" in k for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert max(t.abs().max().item() for k, t in tensors.items() if k.endswith("si_B")) > 0
    assert pixel_change(tiny_pipe, out) > 0.5


def test_lora_baseline_same_loop(tmp_path, make_cfg, tiny_pipe):
    data = image_folder(tmp_path / "data", n=1)
    run_training(make_cfg(data=data, adapter=StyleInjectConfig.lora(rank=4), learning_rate=1e-2))
    out = tmp_path / "out"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"si_A", "si_B"}  # no router, no STA
    assert read_adapter_metadata(out)["adapter_variant"] == "lora"
    assert pixel_change(tiny_pipe, out) > 0.5


def test_distill_shared_uses_feature_kd(tmp_path, make_cfg, tiny_pipe, teacher_pipeline_path):
    data = image_folder(tmp_path / "data", n=2)
    common = {"data": data, "teacher_model": str(teacher_pipeline_path), "learning_rate": 1e-2,
              "adapter": StyleInjectConfig(rank=4, num_styles=2, conv_target_modules=["conv1", "conv2"])}
    with_terms, without_terms = [], []
    run_training(make_cfg("distill", output="with-feat", **common), progress=with_terms.append)
    run_training(make_cfg("distill", output="no-feat", feat_kd_weight=0.0, **common), progress=without_terms.append)
    # the progress carries both terms (L_OutKD, L_FeatKD); a single-term loss reports none
    assert [sorted(p.terms) for p in with_terms] == [["loss_feat_kd", "loss_out_kd"]] * 3
    assert all(math.isfinite(v) and v >= 0 for p in with_terms for v in p.terms.values())
    assert with_terms[-1].loss == pytest.approx(with_terms[-1].terms["loss_out_kd"]
                                                + with_terms[-1].terms["loss_feat_kd"], rel=1e-4)
    assert [p.terms for p in without_terms] == [{}] * 3
    with_feat = load_file(str(tmp_path / "with-feat" / "adapter_model.safetensors"))
    no_feat = load_file(str(tmp_path / "no-feat" / "adapter_model.safetensors"))
    assert any(".conv1." in k for k in with_feat)
    # L_FeatKD contributes gradients: the two runs (same seed, same data) end apart
    assert max((with_feat[k] - no_feat[k]).abs().max().item() for k in with_feat) > 1e-4
    meta = read_adapter_metadata(tmp_path / "with-feat")
    assert meta["kind"] == "distill" and meta["teacher_model"] == str(teacher_pipeline_path)
    assert pixel_change(tiny_pipe, tmp_path / "with-feat") > 0.5


def test_distill_cross_lingual_prompts_only_caches_teacher_samples(tmp_path, make_cfg, tiny_pipe,
                                                                   teacher_pipeline_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"eine rote Katze {i}", "teacher_text": f"a red cat {i}"}) + "\n"
                               for i in range(3)))
    cfg = make_cfg("distill", data=prompts, teacher_model=str(teacher_pipeline_path), learning_rate=1e-2)
    run_training(cfg)
    out = tmp_path / "out"
    cache = out / "cache" / "teacher_latents.safetensors"
    latents = load_file(str(cache))["latents"]
    assert latents.shape == (3, 4, 32, 32) and latents.abs().sum() > 0
    # the cache holds the teacher's own sample of the *teacher* prompt (seed + index)
    teacher = load_pipeline(teacher_pipeline_path, device="cpu")
    teacher.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "guidance_scale": 7.5, "height": 64, "width": 64, "output_type": "latent"}
    own = teacher("a red cat 1", generator=torch.Generator().manual_seed(1), **kwargs).images[0]
    student_prompt = teacher("eine rote Katze 1", generator=torch.Generator().manual_seed(1), **kwargs).images[0]
    assert (own - latents[1]).abs().max() < 1e-3 < (student_prompt - latents[1]).abs().max()
    assert pixel_change(tiny_pipe, out) > 0.5
    # unshared mode needs teacher_text for every item
    plain = tmp_path / "plain.txt"
    plain.write_text("a cat\n")
    with pytest.raises(TrainingError, match="teacher_text"):
        run_training(make_cfg("distill", data=plain, output="o2", teacher_model=str(teacher_pipeline_path),
                              distill_text="unshared"))


def test_dreambooth_with_generated_class_images(tmp_path, make_cfg, tiny_pipe):
    data = image_folder(tmp_path / "inst", n=1, captions=False)
    cfg = make_cfg("dreambooth", data=data, instance_prompt="a photo of sks thing",
                   class_prompt="a photo of a thing", num_class_images=2, prior_loss_weight=1.0,
                   learning_rate=1e-2)
    run_training(cfg)
    out = tmp_path / "out"
    class_images = sorted(p.name for p in (out / "class_images").iterdir())
    assert class_images == ["class-00000.png", "class-00001.png"]
    assert read_adapter_metadata(out)["kind"] == "dreambooth"
    assert pixel_change(tiny_pipe, out) > 0.5


def test_resume_latest_is_exact(tmp_path, make_cfg):
    data = image_folder(tmp_path / "data", n=2)
    opts = {"data": data, "learning_rate": 1e-2, "random_flip": True, "checkpoint_every": 0}
    run_training(make_cfg(output="straight", steps=6, **opts))
    first = run_training(make_cfg(output="resumed", steps=3, **opts))
    assert first.steps_done == 3
    mid = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    result = run_training(make_cfg(output="resumed", steps=6, resume="latest", **opts))
    assert result.steps_done == 6
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - mid[k]).abs().max().item() for k in a) > 1e-4  # steps 4-6 did train
    assert read_adapter_metadata(tmp_path / "resumed")["steps"] == "6"


def test_resume_guards(tmp_path, make_cfg):
    data = image_folder(tmp_path / "data", n=1)
    run_training(make_cfg(data=data, steps=2))
    with pytest.raises(TrainingError, match="already holds checkpoints .* resume latest"):
        run_training(make_cfg(data=data, steps=4))
    with pytest.raises(TrainingError, match="cannot resume.*seed"):
        run_training(make_cfg(data=data, steps=4, seed=1, resume="latest"))
    # a half-written checkpoint (crash before the rename) is ignored and cleaned up
    ckdir = tmp_path / "out" / "checkpoints"
    (ckdir / ".tmp-step-000003").mkdir()
    (ckdir / ".tmp-step-000003" / "adapter_model.safetensors").write_bytes(b"partial")
    (ckdir / "step-000009").mkdir()  # no training_state.json: not complete
    assert latest_checkpoint(tmp_path / "out").name == "step-000002"
    result = run_training(make_cfg(data=data, steps=3, resume="latest"))
    assert result.steps_done == 3 and not (ckdir / ".tmp-step-000003").exists()


def test_default_resolution_is_the_base_models_native_size(tmp_path, make_cfg, tiny_pipe, tiny_pipeline_path):
    import shutil

    from styleinject.pipeline import DEFAULTS_FILE, generation_defaults

    data = image_folder(tmp_path / "data", n=1)
    run_training(make_cfg(data=data, steps=1, resolution=None))
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["resolution"] == generation_defaults(tiny_pipe)["width"] == 64  # sample_size 32 x VAE factor 2
    # a model folder that draws at another size trains at that size; a resume keeps it
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_path, model)
    (model / DEFAULTS_FILE).write_text(json.dumps({"width": 32, "height": 32}))
    run_training(make_cfg(data=data, output="small", base_model=model, steps=1, checkpoint_every=1,
                          resolution=None))
    result = run_training(make_cfg(data=data, output="small", base_model=model, steps=2, checkpoint_every=1,
                                   resolution=None, resume="latest"))
    assert result.steps_done == 2
    assert json.loads((tmp_path / "small" / "train_config.json").read_text())["resolution"] == 32
    assert read_adapter_metadata(tmp_path / "small")["resolution"] == "32"
    with pytest.raises(TrainingError, match="cannot read its unet/vae configs"):
        run_training(make_cfg(data=data, output="bad", base_model=tmp_path / "data", resolution=None))


def test_cancel_saves_a_loadable_checkpoint(tmp_path, make_cfg, tiny_pipeline_path):
    data = image_folder(tmp_path / "data", n=1)
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 2  # polled before every step: cancel before step 3

    result = run_training(make_cfg(data=data, steps=50, learning_rate=1e-2), should_cancel=should_cancel)
    assert result.cancelled and result.steps_done == 2
    assert [p.name for p in result.checkpoints] == ["step-000002"]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()  # no "final" adapter
    unet = load_pipeline(tiny_pipeline_path, device="cpu").unet
    load_adapter(unet, result.checkpoints[0])  # loads as a plain adapter folder


def test_accumulation_checkpointing_and_min_snr(tmp_path, make_cfg):
    data = image_folder(tmp_path / "data", n=3)
    result = run_training(make_cfg(data=data, steps=2, batch_size=2, gradient_accumulation_steps=2,
                                   gradient_checkpointing=True, snr_gamma=5.0, learning_rate=1e-2))
    state = json.loads((result.checkpoints[-1] / "training_state.json").read_text())
    assert state["data_order"] == {"epoch": 2, "pos": 2, "num_items": 3, "seed": 0}  # 2 x 2 x 2 = 8 draws
    assert np.isfinite(result.loss)
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert max(t.abs().max().item() for k, t in tensors.items() if k.endswith("si_B")) > 0


def _eval_loss(base, adapter_dir, image, caption) -> float:
    """Noise-prediction MSE on 16 fixed (noise, t) draws for one image."""
    from diffusers import DDPMScheduler

    pipe = load_pipeline(base, device="cpu")
    if adapter_dir is not None:
        load_adapter(pipe.unet, adapter_dir)
    sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    x = torch.from_numpy(preprocess_image(image, 64))[None]
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn((16, *z.shape[1:]), generator=g)
        t = torch.randint(0, 1000, (16,), generator=g)
        ids = pipe.tokenizer([caption] * 16, padding="max_length", max_length=77, return_tensors="pt").input_ids
        pred = pipe.unet(sched.add_noise(z.expand(16, -1, -1, -1), noise, t), t, pipe.text_encoder(ids)[0]).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


@pytest.mark.parametrize("variant", ["styleinject", "lora"])
def test_loss_goes_down_on_one_image(tmp_path, make_cfg, tiny_pipeline_path, variant):
    data = image_folder(tmp_path / "data", n=1)
    adapter = StyleInjectConfig(rank=4, num_styles=2) if variant == "styleinject" else StyleInjectConfig.lora(rank=4)
    losses = []
    run_training(make_cfg(data=data, steps=12, batch_size=2, learning_rate=2e-2, adapter=adapter),
                 progress=lambda p: losses.append(p.loss))
    caption = (data / "img0.txt").read_text()
    before = _eval_loss(tiny_pipeline_path, None, data / "img0.png", caption)
    after = _eval_loss(tiny_pipeline_path, tmp_path / "out", data / "img0.png", caption)
    assert after < 0.98 * before, (before, after)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])


def test_targets_and_min_snr_weights():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    assert diffusion_target(sched, z0, eps, t) is eps
    v_sched = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    abar = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(diffusion_target(v_sched, z0, eps, t), abar.sqrt() * eps - (1 - abar).sqrt() * z0, atol=1e-6)
    pred = eps + 0.1 * torch.randn(3, 4, 8, 8, generator=g)
    per_sample = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
    snr = abar.flatten() / (1 - abar.flatten())
    expected = (per_sample * torch.clamp(snr, max=5.0) / snr).mean()
    assert torch.allclose(diffusion_loss(pred, eps, t, sched, 5.0), expected, atol=1e-6)
    assert torch.allclose(diffusion_loss(pred, eps, t, sched, None), per_sample.mean(), atol=1e-6)
