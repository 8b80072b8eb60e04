"""Tiny, random, fully offline Stable Diffusion and SDXL pipelines for tests.

It is written in the standard diffusers folder format and read back through the same
``from_pretrained`` path as a real checkpoint, so nothing in the code under test is special-cased.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_RESOLUTION = 64  # the VAE downsamples by 2: 64x64 images are 32x32 latents


def _byte_vocab() -> dict[str, int]:
    """A byte-level CLIP BPE vocabulary with no merges: every character is a token."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_tokenizer(path: str | Path, model_max_length: int = 77):
    """Write a CLIP tokenizer with a byte-level vocabulary to ``path`` and return it."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(_byte_vocab()))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"),
                              model_max_length=model_max_length)
    tokenizer.save_pretrained(str(path))
    return tokenizer


def tiny_components(cross_attention_dim: int = 32, seed: int = 0) -> dict:
    """Seeded random components in diffusers' ``get_dummy_components`` style."""
    import tempfile

    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=2)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=2)
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=cross_attention_dim, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=77))
    return {"unet": unet, "vae": vae, "scheduler": scheduler, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "safety_checker": None, "feature_extractor": None}


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Seeded random SDXL components in the shape of diffusers' SDXL ``get_dummy_components``: two
    text encoders (hidden 32 each, concatenated to the UNet's 64-wide cross-attention; the second
    with a 32-wide projection for the pooled embedding), micro-conditioning time ids embedded 8 wide
    (6 x 8 + 32 = 80 inputs to the added embedding), a second down level with 2 transformer layers."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=2)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=2,
        sample_size=64, scaling_factor=0.13025, force_upcast=True)
    # SDXL's own scheduler config (EulerDiscreteScheduler, leading spacing)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(tmp)
    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77,
        hidden_act="gelu", projection_dim=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    return {"unet": unet, "vae": vae, "scheduler": scheduler, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer,
            "image_encoder": None, "feature_extractor": None}


def tiny_pipeline(path: str | Path, seed: int = 0, kind: str = "sd") -> Path:
    """Write a tiny random pipeline to ``path`` (diffusers format) and return it: ``kind="sd"`` a
    ``StableDiffusionPipeline``, ``kind="sdxl"`` a ``StableDiffusionXLPipeline``.

    Deterministic for a given ``seed``; one 2-step 64x64 generation takes well under a second on CPU.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if kind == "sd":
        pipe = StableDiffusionPipeline(**tiny_components(seed=seed), requires_safety_checker=False)
    elif kind == "sdxl":
        pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed=seed), add_watermarker=False)
    else:
        raise ValueError(f"kind must be 'sd' or 'sdxl', not {kind!r}")
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
