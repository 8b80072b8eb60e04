"""SDXL: loading, generation equal to diffusers' StableDiffusionXLPipeline, adapter placement, the
serving engine's per-sample micro-conditioning."""

import numpy as np
import pytest
import torch

from styleinject import StyleInjectConfig, adapter_parameters, inject, save_adapter
from styleinject.families import SD, SDXL, Conditioning, family_of
from styleinject.pipeline import generate, load_pipeline
from styleinject.serving import Engine
from styleinject.serving.request import Request
from styleinject.serving.tiers import AdapterRef


def _px(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.fixture(scope="module")
def xl(tiny_sdxl_path):
    pipe = load_pipeline(tiny_sdxl_path, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(path):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(str(path), add_watermarker=False)
    ref.scheduler = EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_load_pipeline_picks_the_family(xl, tiny_pipeline_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    assert isinstance(xl, StableDiffusionXLPipeline) and family_of(xl) is SDXL
    assert type(xl.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    sd = load_pipeline(tiny_pipeline_path, device="cpu")
    assert type(sd) is StableDiffusionPipeline and family_of(sd) is SD


def test_no_adapter_equals_diffusers_sdxl(xl, tiny_sdxl_path):
    """Bit-equal pixels: the engine runs diffusers' own operations in the same order and dtype.
    Both guidance on (with a negative prompt, and with SDXL's zeroed empty negative) and off."""
    ref = _reference(tiny_sdxl_path)
    for kw in ({"negative_prompt": "blurry", "guidance_scale": 5.0}, {"guidance_scale": 5.0},
               {"guidance_scale": 1.0}):
        want = ref("a red square", num_inference_steps=3, width=64, height=64, num_images_per_prompt=2,
                   generator=torch.Generator().manual_seed(42), **kw).images
        got = generate(xl, "a red square", seed=42, steps=3, width=64, height=64, num_images=2, **kw)
        assert got[0].size == (64, 64)
        assert np.array_equal(_px(got), _px(want)), kw
    other = generate(xl, "a red square", seed=43, steps=3, width=64, height=64, num_images=2, guidance_scale=1.0)
    assert not np.array_equal(_px(other), _px(want))


def test_paper_placement_on_every_sdxl_attention_block(tiny_sdxl_path):
    from diffusers import UNet2DConditionModel

    from styleinject.adapters.layers import StyleInjectLayer

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sdxl_path), subfolder="unet")
    attn = [n for n, m in unet.named_modules() if type(m).__name__ == "Attention"]
    inject(unet, StyleInjectConfig(rank=4, num_styles=2))
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, StyleInjectLayer)}
    assert attn and len(layers) == 2 * len(attn)  # to_q and to_v of self- and cross-attention
    for name in attn:  # down, mid and up blocks, both transformer layers of the 2-deep level
        q, v = layers[f"{name}.to_q"], layers[f"{name}.to_v"]
        assert "default" in q.si_router_weight and "default" in q.si_G, name  # DMA + STA
        assert "default" not in v.si_router_weight and "default" not in v.si_G, name  # plain low rank
    assert any(".transformer_blocks.1." in n for n in attn) and any(n.startswith("mid_block") for n in attn)


def _adapter(path, out, seed):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet")
    inject(unet, StyleInjectConfig(rank=4, num_styles=2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return save_adapter(unet, out)


def test_sdxl_engine_mixed_batch_carries_added_cond_per_sample(tiny_sdxl_path, tmp_path):
    """Two requests (other prompts: other pooled embeds), one with an adapter, in one UNet batch:
    each equals itself run alone."""
    pipe = load_pipeline(tiny_sdxl_path, device="cpu")
    folder = _adapter(tiny_sdxl_path, tmp_path / "ad", seed=0)
    engine = Engine(pipe, autostart=False)
    kw = {"steps": 2, "width": 64, "height": 64, "guidance_scale": 5.0}
    seen = []
    forward = pipe.unet.forward

    def spy(*args, **kwargs):
        seen.append({k: tuple(v.shape) for k, v in kwargs["added_cond_kwargs"].items()})
        return forward(*args, **kwargs)

    def run(*requests):
        futures = [engine.submit(r) for r in requests]
        while not all(f.done() for f in futures):
            engine.step()
        return [_px(f.result()) for f in futures]

    cat, dog = Request("a cat", seed=1, **kw), Request("a dog", seed=2, adapters=[AdapterRef(str(folder))], **kw)
    (alone_a,), (alone_b,) = run(cat), run(dog)
    (plain_b,) = run(Request("a dog", seed=2, **kw))
    assert np.abs(alone_b - plain_b).max() > 10  # the adapter acts on SDXL
    pipe.unet.forward = spy
    try:
        got_a, got_b = run(Request("a cat", seed=1, **kw), Request("a dog", seed=2, adapters=[AdapterRef(str(folder))], **kw))
    finally:
        del pipe.unet.forward
    assert seen[0] == {"text_embeds": (4, 32), "time_ids": (4, 6)}  # 2 requests x [uncond; cond]
    assert np.abs(got_a - alone_a).max() <= 1
    assert np.abs(got_b - alone_b).max() <= 1


def test_conditioning_refuses_to_batch_families():
    sd = Conditioning(torch.zeros(1, 3, 4))
    xl = Conditioning(torch.zeros(1, 3, 4), {"text_embeds": torch.zeros(1, 2), "time_ids": torch.zeros(1, 6)})
    with pytest.raises(ValueError, match="families"):
        Conditioning.cat([sd, xl])
    both = Conditioning.cat([xl, xl]).pad(2)
    assert both.rows == 4 and both.added["time_ids"].shape == (4, 6)


def test_fp16_decodes_in_fp32_like_diffusers(tiny_sdxl_path):
    """SDXL's VAE overflows in fp16: with force_upcast it decodes in fp32 and goes back to fp16,
    as diffusers does (fp16 runs on the CPU too, slowly; the tiny model makes it cheap)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    pipe = load_pipeline(tiny_sdxl_path, device="cpu", dtype=torch.float16)
    ref = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path), dtype=torch.float16, add_watermarker=False)
    ref.scheduler = EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    want = ref("a cat", num_inference_steps=2, width=64, height=64, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(1)).images
    got = generate(pipe, "a cat", seed=1, steps=2, width=64, height=64, guidance_scale=5.0)
    assert np.array_equal(_px(got), _px(want))
    assert pipe.vae.dtype == torch.float16


def test_unsupported_pipeline_class_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ValueError, match="'FluxPipeline' is not supported.*StableDiffusionXLPipeline"):
        load_pipeline(tmp_path, device="cpu")
