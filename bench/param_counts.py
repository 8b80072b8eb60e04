"""Adapter parameter counts on SD 1.5- and SDXL-shaped UNets (built from their configs on the meta
device, no weights downloaded).

    python bench/param_counts.py            # prints the markdown table used in docs/adapters.md
"""

from __future__ import annotations

import math

import torch

from styleinject import StyleInjectConfig
from styleinject.adapters.model import expected_state_shapes

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that differ from the defaults)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)

ROWS = [
    ("LoRA r=32 (to_q, to_v)", StyleInjectConfig.lora(rank=32)),
    ("LoRA r=128 (to_q, to_v)", StyleInjectConfig.lora(rank=128)),
    ("LoRA r=512 (to_q, to_v)", StyleInjectConfig.lora(rank=512)),
    ("LoRA r=32 (to_q, to_k, to_v, to_out.0)", StyleInjectConfig.lora(rank=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"])),
    ("StyleInject n=1, r=32 (STA only)", StyleInjectConfig(rank=32, num_styles=1)),
    ("StyleInject n=4, r=32", StyleInjectConfig(rank=32, num_styles=4)),
    ("StyleInject n=16, r=32 (paper-text default)", StyleInjectConfig(rank=32, num_styles=16)),
    ("paper-counts preset n=1, r=32 (DMA+STA on to_q and to_v)", StyleInjectConfig.paper_counts(1)),
    ("paper-counts preset n=4, r=32", StyleInjectConfig.paper_counts(4)),
    ("paper-counts preset n=16, r=32", StyleInjectConfig.paper_counts(16)),
    ("StyleInject n=16, r=32 + resnet convs (distillation)",
     StyleInjectConfig(rank=32, num_styles=16, conv_target_modules=["conv1", "conv2"],
                       style_modules=["to_q", "conv1", "conv2"])),
]


def sd15_unet():
    return _meta_unet(SD15_UNET)


def sdxl_unet():
    return _meta_unet(SDXL_UNET)


def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def count(unet, cfg: StyleInjectConfig) -> int:
    return sum(math.prod(shape) for shape in expected_state_shapes(unet, cfg).values())


def main() -> None:
    for name, unet in (("SD 1.5", sd15_unet()), ("SDXL", sdxl_unet())):
        base = sum(p.numel() for p in unet.parameters())
        print(f"{name} UNet: {base / 1e6:.1f} M parameters\n")
        print("| adapter | parameters | % of UNet |")
        print("|---|---:|---:|")
        for label, cfg in ROWS:
            n = count(unet, cfg)
            print(f"| {label} | {n / 1e6:.2f} M | {100 * n / base:.2f} % |")
        if name == "SD 1.5":
            print("\nThe paper reports 3.34 / 8.41 / 28.70 M for n = 1 / 4 / 16 on SD 1.5: the paper-counts rows.")
        print()


if __name__ == "__main__":
    main()
