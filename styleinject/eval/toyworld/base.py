"""The toy world's base text-to-image model, pretrained from scratch on rendered scenes.

Standard diffusers ``StableDiffusionPipeline`` folder (loads with ``styleinject.pipeline.load_pipeline``):

- ``vae``: a small ``AutoencoderKL`` (2 levels of 16/32 channels, no mid-block attention, 32x32x3 images <-> 16x16x4 latents), trained first
  for a few minutes on rendered scenes (MSE + a tiny KL term). A hand-set identity VAE is not
  possible with diffusers' blocks (GroupNorm + SiLU before ``conv_out`` are not invertible per
  image), and the real SD recipe (frozen trained autoencoder, diffusion in its latent space) is the
  one the adapters and the training engine assume. ``scaling_factor`` = 1 / std of the latents;
  the posterior variance is then fixed at ~0 (``make_deterministic``) so the training engine's
  posterior samples are the means the base model was trained on.
- ``tokenizer``: the word-level toy tokenizer (``text.py``), ``text_encoder``: a 2-layer
  ``CLIPTextModel`` (width 64) trained jointly with the UNet (captions dropped 10% of the time
  for classifier-free guidance).
- ``unet``: ``UNet2DConditionModel`` (32/64 channels; 16x16 plain resnets, cross-attention
  transformer blocks at 8x8 and in the middle: attention at 16x16 tripled the step time on CPU) (to_q/to_k/to_v/to_out.0
  and resnet conv1/conv2, where StyleInject and LoRA attach), epsilon prediction with SD's
  scaled-linear beta schedule; ``scheduler``: Euler Ancestral, as everywhere in the project.

Weights are an exponential moving average (decay 0.999) of the trained ones. The output folder is
rewritten every ``--checkpoint-minutes`` (write to a temporary folder, then rename), so an
interrupted run leaves a usable model.

    python -m styleinject.eval.toyworld.base --out styleinject/assets/toy-base --minutes 25

The "community teacher" for distillation is the base fully fine-tuned on one style: the same loop
started from the base (``--init``), VAE and text encoder frozen (shared with the student), every
UNet weight trained on styled renders:

    python -m styleinject.eval.toyworld.base --init styleinject/assets/toy-base --style stripes \
        --out models/toy-teacher-stripes --steps 600 --lr 2e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from styleinject.pipeline import DEFAULTS_FILE

from .render import DEFAULT_RESOLUTION, caption, render, scene_at
from .styles import STYLES, apply_style
from .text import MAX_LENGTH, toy_tokenizer

TRAIN_SEED = 0        # world seed of the training scenes
CFG_DROP = 0.1
# checked by alignment.py: guidance 4 and 30 Euler Ancestral steps at the training resolution
GENERATION_DEFAULTS = {"steps": 30, "guidance_scale": 4.0, "width": DEFAULT_RESOLUTION, "height": DEFAULT_RESOLUTION}


def build_components(seed: int = 0, text_dim: int = 64) -> dict:
    import tempfile

    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = toy_tokenizer(tmp)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=8, layers_per_block=1, mid_block_add_attention=False,
                        sample_size=DEFAULT_RESOLUTION)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=text_dim, intermediate_size=4 * text_dim,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=DEFAULT_RESOLUTION // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=text_dim,
        attention_head_dim=8, norm_num_groups=16)
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                num_train_timesteps=1000, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def render_training_set(n: int, seed: int = TRAIN_SEED, style: str | None = None) -> tuple[torch.Tensor, list[str]]:
    """Rendered scenes (in ``style``; style "mixed": 50% plain, 50% a random target style)."""
    rng = np.random.default_rng(seed + 99)
    scenes = [scene_at(seed, i) for i in range(n)]
    styles = [style] * n
    if style == "mixed":
        styles = [STYLES[rng.integers(len(STYLES))] if rng.random() < 0.5 else None for _ in range(n)]
    pixels = np.stack([np.asarray(apply_style(render(s), st), dtype=np.uint8) for s, st in zip(scenes, styles)])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [caption(s) for s in scenes]


def save_pipeline(components: dict, out: Path) -> None:
    """Write the pipeline to ``out`` atomically (tmp folder + rename)."""
    from diffusers import StableDiffusionPipeline

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    # how this model is meant to be sampled (read by styleinject.pipeline when an option is unset)
    (tmp / DEFAULTS_FILE).write_text(json.dumps(GENERATION_DEFAULTS, indent=2, sort_keys=True) + "\n")
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def train_vae(vae, x: torch.Tensor, steps: int, batch: int, log, kl_weight: float = 1e-6, lr0: float = 2e-3) -> None:
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr0, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        lr = lr0 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(x), (batch,), generator=g)
        dist = vae.encode(x[idx]).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x[idx]) + kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.5f}")
    vae.eval()


@torch.no_grad()
def make_deterministic(vae) -> None:
    """Fix the posterior log-variance at -30 (std ~ 3e-7): the encoder then returns its mean.

    The base UNet is trained on posterior means; the training engine samples z = mean + std * eps,
    and with the tiny KL weight the learned std (~0.5 against a latent std of ~0.8) would hand the
    adapters far noisier latents than the base model ever saw. ``quant_conv`` maps the encoder
    output to (mean, logvar); its logvar half becomes weight 0, bias -30 (diffusers clamps there).
    """
    c = vae.config.latent_channels
    vae.quant_conv.weight[c:] = 0.0
    vae.quant_conv.bias[c:] = -30.0


@torch.no_grad()
def encode_all(vae, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + batch]).latent_dist.mean for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Pretrain the toy-world base text-to-image model.")
    p.add_argument("--out", default="styleinject/assets/toy-base")
    p.add_argument("--minutes", type=float, default=25.0,
                   help="wall-time budget of the UNet phase when --steps is not given (steps are then "
                        "estimated from the speed of the first steps and written to train_config.json)")
    p.add_argument("--steps", type=int, default=None, help="UNet steps (overrides --minutes; reproducible)")
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-only", action="store_true",
                   help="train only the autoencoder (on plain + styled scenes) and save it to --out")
    p.add_argument("--vae", default=None, help="use this trained autoencoder folder (from --vae-only) "
                   "instead of training one")
    p.add_argument("--num-scenes", type=int, default=40000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--init", default=None, help="start from this toy pipeline (teacher fine-tuning): "
                   "VAE and text encoder stay frozen, only the UNet trains")
    p.add_argument("--style", choices=STYLES, default=None, help="render the training scenes in this style")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.name + ".log")
    t0 = time.time()

    def log(msg: str) -> None:
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    # 1. data: rendered scenes of world TRAIN_SEED
    from diffusers import DDPMScheduler

    if a.vae_only:
        comps = build_components(a.seed)
        x, _ = render_training_set(a.num_scenes, style="mixed")
        log(f"rendered {len(x)} scenes (half of them styled)")
        train_vae(comps["vae"], x, a.vae_steps, a.batch_size, log)
        make_deterministic(comps["vae"])
        with torch.no_grad():
            lat = encode_all(comps["vae"], x[:4096])
            rec = comps["vae"].decode(lat[:512]).sample
        comps["vae"].register_to_config(scaling_factor=float(1.0 / lat.std()))
        log(f"vae recon mse {F.mse_loss(rec, x[:512]).item():.5f}  scaling_factor {comps['vae'].config.scaling_factor:.4f}")
        comps["vae"].save_pretrained(str(out), safe_serialization=True)
        (out / "train_config.json").write_text(json.dumps({**vars(a), "reproduce": (
            f"python -m styleinject.eval.toyworld.base --vae-only --out {a.out} --vae-steps {a.vae_steps} "
            f"--num-scenes {a.num_scenes} --batch-size {a.batch_size} --seed {a.seed}")}, indent=2) + "\n")
        log("done")
        return
    if a.init:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(a.init)
        comps = {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    else:
        comps = build_components(a.seed)
    x, captions = render_training_set(a.num_scenes, style=a.style)
    log(f"rendered {len(x)} scenes (style {a.style})")

    # 2. autoencoder (skipped from --init), then the latents of every scene (posterior means),
    #    scaled to unit std
    if a.vae:
        from diffusers import AutoencoderKL

        comps["vae"] = AutoencoderKL.from_pretrained(a.vae)
    vae = comps["vae"]
    if not a.init and not a.vae:
        train_vae(vae, x, a.vae_steps, a.batch_size, log)
        make_deterministic(vae)
    vae.requires_grad_(False)
    latents = encode_all(vae, x)
    with torch.no_grad():
        rec = vae.decode(latents[:256]).sample
    if not a.init and not a.vae:
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    scale = vae.config.scaling_factor
    latents = latents * scale
    log(f"vae recon mse {F.mse_loss(rec, x[:256]).item():.5f}  scaling_factor {scale:.4f}")

    # 3. tokens (captions are fixed, so tokenise once; "" for the unconditional branch)
    tok = comps["tokenizer"]
    ids = tok(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids

    # 4. UNet + text encoder, epsilon prediction, EMA weights
    unet, te = comps["unet"], comps["text_encoder"]
    noise_sched = DDPMScheduler.from_config(comps["scheduler"].config)
    if a.init:
        te.requires_grad_(False)
    params = [p_ for p_ in list(unet.parameters()) + list(te.parameters()) if p_.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    ema_params = [e for e, p_ in zip(list(ema_unet.parameters()) + list(ema_te.parameters()),
                                     list(unet.parameters()) + list(te.parameters())) if p_.requires_grad]
    unet.train()
    te.train(not a.init)
    g = torch.Generator().manual_seed(a.seed)
    steps = a.steps
    est_steps = 10**9 if steps is None else steps
    last_ckpt = time.time()
    t_unet = time.time()
    step = 0
    while step < est_steps:
        warm = min(1.0, (step + 1) / 200)
        lr = a.lr * warm * (0.5 * (1 + math.cos(math.pi * min(step / est_steps, 1.0))) if steps or step > 20 else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latents), (a.batch_size,), generator=g)
        z0 = latents[idx]
        drop = torch.rand(a.batch_size, generator=g) < CFG_DROP
        batch_ids = torch.where(drop[:, None], empty.expand(a.batch_size, -1), ids[idx])
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (a.batch_size,), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = te(batch_ids)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        step += 1
        if steps is None and step == 30:
            per_step = (time.time() - t_unet) / 30
            est_steps = max(31, int((a.minutes * 60 - (time.time() - t_unet)) / per_step) + 30)
            log(f"{per_step:.3f}s/step -> {est_steps} UNet steps in {a.minutes} min")
        if step % 50 == 0:
            log(f"step {step}/{est_steps} loss {loss.item():.4f} lr {lr:.2e}")
        if time.time() - last_ckpt > a.checkpoint_minutes * 60 or step == est_steps:
            save_pipeline({**comps, "unet": ema_unet, "text_encoder": ema_te}, out)
            cfg = {**vars(a), "steps_done": step, "steps_planned": est_steps, "final": step == est_steps,
                   "wall_s": round(time.time() - t0, 1),
                   "reproduce": f"python -m styleinject.eval.toyworld.base --out {a.out} --steps {est_steps} "
                                f"--vae-steps {a.vae_steps} --num-scenes {a.num_scenes} --batch-size {a.batch_size} "
                                f"--lr {a.lr} --seed {a.seed}" + (f" --vae {a.vae}" if a.vae else "")
                                + (f" --init {a.init}" if a.init else "") + (f" --style {a.style}" if a.style else "")}
            (out / "train_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            log(f"saved {out} at step {step}")
            last_ckpt = time.time()
    log("done")


if __name__ == "__main__":
    main()
