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


def tiny_sd2_components(seed: int = 0) -> dict:
    """SD 2.x's differences from SD 1.x on the tiny model: v-prediction (``prediction_type`` of
    stable-diffusion-2-1), linear transformer projections and per-level head sizes in the UNet, and
    an OpenCLIP-style text encoder (``gelu``; saved in a single file as OpenCLIP's resblocks)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    parts = tiny_components(seed=seed)
    torch.manual_seed(seed)
    parts["unet"] = UNet2DConditionModel.from_config(parts["unet"].config, attention_head_dim=(2, 4),
                                                     use_linear_projection=True)
    parts["scheduler"] = EulerDiscreteScheduler.from_config(parts["scheduler"].config, prediction_type="v_prediction")
    torch.manual_seed(seed)
    config = parts["text_encoder"].config
    config.hidden_act = "gelu"
    parts["text_encoder"] = CLIPTextModel(config)
    return parts


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Seeded random SDXL components shaped like diffusers' SDXL ``get_dummy_components``: two text
    encoders of different widths like SDXL's (32 and 48, concatenated to the UNet's 80-wide
    cross-attention; the second with a 32-wide projection for the pooled embedding; different widths
    also tell them apart in a single-file checkpoint, as diffusers' loader does), micro-conditioning
    time ids embedded 8 wide (6 x 8 + 32 = 80 inputs to the added embedding), a second down level
    with 2 transformer layers."""
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
        projection_class_embeddings_input_dim=80, cross_attention_dim=80, norm_num_groups=2)
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

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-05,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77,
            hidden_act="gelu", projection_dim=32)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(48))
    return {"unet": unet, "vae": vae, "scheduler": scheduler, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer,
            "image_encoder": None, "feature_extractor": None}


def tiny_pipeline(path: str | Path, seed: int = 0, kind: str = "sd") -> Path:
    """Write a tiny random pipeline to ``path`` (diffusers format) and return it: ``kind="sd"`` a
    ``StableDiffusionPipeline`` like SD 1.x, ``kind="sd2"`` one like SD 2.x (v-prediction, see
    ``tiny_sd2_components``), ``kind="sdxl"`` a ``StableDiffusionXLPipeline``.

    Deterministic for a given ``seed``; one 2-step 64x64 generation takes well under a second on CPU.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if kind in ("sd", "sd2"):
        parts = tiny_components(seed=seed) if kind == "sd" else tiny_sd2_components(seed=seed)
        pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    elif kind == "sdxl":
        pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed=seed), add_watermarker=False)
    else:
        raise ValueError(f"kind must be 'sd', 'sd2' or 'sdxl', not {kind!r}")
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


# -- single-file checkpoints ----------------------------------------------------------------------
# The inverse of diffusers' single-file conversion (diffusers/loaders/single_file_utils.py:
# convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
# convert_open_clip_checkpoint), written for any block layout so that tiny models can be saved the
# way community checkpoints are (CompVis LDM for SD 1.x, Stability's SGM for SDXL).

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_key(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_RESNET[layer]}.{tail}"


def _ldm_unet(state: dict, config: dict) -> dict:
    per = config["layers_per_block"] + 1
    with_attn = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{param}"
        elif parts[0] in ("down_blocks", "up_blocks") and parts[2] in ("resnets", "attentions"):
            b, layer, rest = int(parts[1]), int(parts[3]), ".".join(parts[4:])
            index = 1 + b * per + layer if parts[0] == "down_blocks" else b * per + layer
            where = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
            new = f"{where}.{index}.0.{_resnet_key(rest)}" if parts[2] == "resnets" else f"{where}.{index}.1.{rest}"
        elif parts[0] == "down_blocks" and parts[2] == "downsamplers":
            new = f"input_blocks.{(int(parts[1]) + 1) * per}.0.op.{parts[-1]}"
        elif parts[0] == "up_blocks" and parts[2] == "upsamplers":
            b = int(parts[1])
            new = f"output_blocks.{b * per + per - 1}.{2 if b in with_attn else 1}.conv.{parts[-1]}"
        elif parts[0] == "mid_block":
            rest = ".".join(parts[3:])
            new = f"middle_block.{2 * int(parts[2])}.{_resnet_key(rest)}" if parts[1] == "resnets" \
                else f"middle_block.1.{rest}"
        else:
            raise KeyError(f"no original-layout name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _ldm_vae(state: dict, config: dict) -> dict:
    levels = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        side, parts = key.split(".", 1)[0], key.split(".")[1:]
        if parts[0] in ("down_blocks", "up_blocks"):
            b = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])
            where = "down" if parts[0] == "down_blocks" else "up"
            if parts[2] == "resnets":
                tail = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{where}.{b}.block.{parts[3]}.{tail}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{side}.{where}.{b}.{'downsample' if where == 'down' else 'upsample'}.conv.{parts[-1]}"
        elif parts[0] == "mid_block" and parts[1] == "resnets":
            tail = ".".join(parts[3:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{side}.mid.block_{int(parts[2]) + 1}.{tail}"
        elif parts[0] == "mid_block":  # attentions.0.<layer>[.0].<param>: 1x1 convolutions originally
            new = f"{side}.mid.attn_1.{_VAE_ATTN[parts[3]]}.{parts[-1]}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif parts[0] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[-1]}"
        else:  # conv_in, conv_out, quant_conv, post_quant_conv
            new = key
        out["first_stage_model." + new] = value
    return out


def _ldm_clip(state: dict, prefix: str) -> dict:
    """transformers' CLIPTextModel (HF layout, which the originals also use for CLIP ViT-L)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def _open_clip(state: dict, prefix: str) -> dict:
    """A CLIP text model as OpenCLIP's (SDXL's second encoder, SD 2.x's only one): fused qkv,
    resblocks, a transposed text projection. SD 2.x's diffusers encoder has no projection, but
    OpenCLIP's file does and diffusers reads its width from it: an identity stands in."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    position = state.pop("embeddings.position_embedding.weight")
    projection = state.pop("text_projection.weight", None)
    out = {prefix + "positional_embedding": position,
           prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "text_projection": torch.eye(position.shape[1]) if projection is None else projection.T.contiguous()}
    for p in ("weight", "bias"):
        out[prefix + f"ln_final.{p}"] = state.pop(f"final_layer_norm.{p}")
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([state.pop(src + f"self_attn.{x}_proj.{p}") for x in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{p}"] = state.pop(src + f"{a}.{p}")
    state.pop("embeddings.position_ids", None)
    if state:
        raise KeyError(f"no original-layout name for text encoder keys {sorted(state)}")
    return out


def write_single_file(pipeline_dir: str | Path, out_file: str | Path) -> Path:
    """Save a diffusers SD 1.x/2.x or SDXL pipeline folder as one ``.safetensors`` checkpoint in the
    original key layout (what community checkpoints look like), for tests of single-file loading.
    SD 2.x is told from SD 1.x by its text encoder's activation (OpenCLIP's ``gelu``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipeline_dir, out_file = Path(pipeline_dir), Path(out_file)
    class_name = json.loads((pipeline_dir / "model_index.json").read_text())["_class_name"]
    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(pipeline_dir), subfolder="vae")
    state = {**_ldm_unet(unet.state_dict(), unet.config), **_ldm_vae(vae.state_dict(), vae.config)}
    encoder = CLIPTextModel.from_pretrained(str(pipeline_dir), subfolder="text_encoder").state_dict()
    if class_name == "StableDiffusionXLPipeline":
        state.update(_ldm_clip(encoder, "conditioner.embedders.0.transformer."))
        encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(pipeline_dir), subfolder="text_encoder_2")
        state.update(_open_clip(encoder_2.state_dict(), "conditioner.embedders.1.model."))
    elif class_name == "StableDiffusionPipeline" and json.loads(
            (pipeline_dir / "text_encoder" / "config.json").read_text()).get("hidden_act") == "gelu":
        state.update(_open_clip(encoder, "cond_stage_model.model."))
    elif class_name == "StableDiffusionPipeline":
        state.update(_ldm_clip(encoder, "cond_stage_model.transformer."))
    else:
        raise ValueError(f"{pipeline_dir}: {class_name} is not SD 1.x or SDXL")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))
    return out_file
