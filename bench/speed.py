"""Speed of StyleInject against PEFT / diffusers anchors, measured in one process, as ratios.

    python bench/speed.py [--repeats 5] [--threads 2]

1. Training step (forward + backward + AdamW step) of a mid-size UNet on 32x32 latents:
   anchor = PEFT LoRA r=32 on to_q/to_v (diffusers `add_adapter`);
   ours = LoRA mode r=32 (same targets) and StyleInject n=16 r=32 (DMA+STA on to_q).
2. Inference forward of the same UNet, same three variants.
3. Adapter switch on a resident UNet: anchor = diffusers `load_lora_adapter` from disk (then
   `delete_adapters`), ours = `load_adapter` from disk into a slot (serving swaps: bench/serve.py).
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from styleinject import StyleInjectConfig, adapter_parameters, inject, load_adapter, save_adapter

UNET = dict(block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=32, cross_attention_dim=128,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
            attention_head_dim=8)


def make_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET)


def inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(batch, 4, 32, 32, generator=g), "timestep": torch.tensor([10] * batch),
            "encoder_hidden_states": torch.randn(batch, 16, 128, generator=g)}


def peft_lora(unet, rank=32):
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    return [p for p in unet.parameters() if p.requires_grad]


def ours(cfg):
    def build(unet):
        inject(unet, cfg)
        with torch.no_grad():  # non-zero B and G so no branch is trivially skipped
            for p in adapter_parameters(unet):
                p.normal_(0, 0.01)
        return adapter_parameters(unet)
    return build


VARIANTS = [("PEFT LoRA r=32 (anchor)", peft_lora),
            ("ours, LoRA mode r=32", ours(StyleInjectConfig.lora(rank=32))),
            ("ours, StyleInject n=16 r=32", ours(StyleInjectConfig(rank=32, num_styles=16)))]


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_step(repeats):
    rows = []
    x = inputs()
    target = torch.randn_like(x["sample"])
    for label, build in VARIANTS:
        unet = make_unet()
        params = build(unet)
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(unet(**x).sample, target)
            loss.backward()
            opt.step()

        def forward():
            with torch.no_grad():
                unet(**x)

        rows.append((label, timed(step, repeats), timed(forward, repeats), sum(p.numel() for p in params)))
    return rows


def bench_switch(repeats):
    from peft import LoraConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        donor = make_unet()
        donor.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
        donor.save_lora_adapter(str(tmp / "peft"), weight_name="lora.safetensors")
        donor = make_unet()
        inject(donor, StyleInjectConfig.lora(rank=32))
        save_adapter(donor, tmp / "ours-lora")
        donor = make_unet()
        inject(donor, StyleInjectConfig(rank=32, num_styles=16))
        save_adapter(donor, tmp / "ours-si")

        unet = make_unet()

        def diffusers_load():
            unet.load_lora_adapter(str(tmp / "peft"), weight_name="lora.safetensors", adapter_name="x", prefix=None)
            unet.delete_adapters("x")

        anchor = timed(diffusers_load, repeats)
        resident = make_unet()
        load_adapter(resident, tmp / "ours-si")

        def ours_disk():
            load_adapter(resident, tmp / "ours-si")  # same name, same shapes: in-place copy from disk

        # serving swaps (device slots, host cache, disk) are measured in bench/serve.py
        return [("diffusers load_lora_adapter + delete (anchor)", anchor),
                ("ours load_adapter from disk, in place (n=16)", timed(ours_disk, repeats))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    rows = bench_step(args.repeats)
    anchor_step, anchor_fwd = rows[0][1], rows[0][2]
    print("| variant | trainable params | train step | ratio | forward | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, step, fwd, n in rows:
        print(f"| {label} | {n / 1e6:.2f} M | {step * 1e3:.0f} ms | {step / anchor_step:.2f} | "
              f"{fwd * 1e3:.0f} ms | {fwd / anchor_fwd:.2f} |")
    switch = bench_switch(args.repeats)
    print("\n| adapter switch | time | ratio |")
    print("|---|---:|---:|")
    for label, t in switch:
        print(f"| {label} | {t * 1e3:.1f} ms | {t / switch[0][1]:.2f} |")


if __name__ == "__main__":
    main()
