"""The math every kind shares: text and image encoding, forward noising, targets and L_task."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from styleinject.families import Conditioning, family_of
from styleinject.train.config import TrainingError
from styleinject.train.context import TrainContext


def encode_text(ctx: TrainContext, pipe, prompts: list[str]) -> Conditioning:
    """c = tau(y): the UNet conditioning of ``pipe``'s model family for ``prompts`` (SD: the text
    encoder's hidden states; SDXL: both encoders', the pooled embedding and the micro-conditioning
    of a ``resolution``-sided image). Call the UNet with ``**c.unet_kwargs()``."""
    size = (ctx.cfg.resolution, ctx.cfg.resolution)
    return family_of(pipe).encode_prompts(pipe, prompts, ctx.device, size)


def _global_draw(ctx: TrainContext, draw, rows: int):
    """This process's rows of a draw for the global batch. Data-parallel processes share one noise
    generator (same seed, same calls) and each draw ``rows x num_processes`` rows, then keep their own
    slice, so N processes with batch b use exactly the noise of one process with batch N x b (the
    sampler splits the data the same way; tests/train/test_multiprocess.py)."""
    n, index = ctx.accelerator.num_processes, ctx.accelerator.process_index
    return draw(rows * n)[index * rows:(index + 1) * rows] if n > 1 else draw(rows)


def encode_images(ctx: TrainContext, pixel_values: torch.Tensor) -> torch.Tensor:
    vae = ctx.models.vae
    pixel_values = pixel_values.to(ctx.device, dtype=vae.dtype)
    with torch.no_grad():
        dist = vae.encode(pixel_values).latent_dist
    # z ~ N(mean, std) with our generator (the VAE's own sample() would use the global RNG)
    shape = dist.mean.shape
    noise = _global_draw(ctx, lambda rows: torch.randn((rows, *shape[1:]), generator=ctx.generator, device=ctx.device,
                                                       dtype=dist.mean.dtype), shape[0])
    latents = dist.mean + dist.std * noise
    return latents * vae.config.scaling_factor


def add_noise(ctx: TrainContext, latents: torch.Tensor):
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1}; returns (z_t, eps, t)."""
    sched = ctx.models.noise_scheduler
    latents = latents.to(ctx.device, dtype=torch.float32)
    rows = latents.shape[0]
    noise = _global_draw(ctx, lambda n: torch.randn((n, *latents.shape[1:]), generator=ctx.generator,
                                                    device=ctx.device), rows)
    t = _global_draw(ctx, lambda n: torch.randint(0, sched.config.num_train_timesteps, (n,), generator=ctx.generator,
                                                  device=ctx.device), rows).long()
    return sched.add_noise(latents, noise, t), noise, t


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":  # v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0
        return noise_scheduler.get_velocity(latents.float(), noise, t)
    raise TrainingError("scheduler prediction_type {got!r} is not supported; use epsilon or v_prediction",
                        got=kind)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, noise_scheduler,
                   snr_gamma: float | None) -> torch.Tensor:
    """L_task = E ||pred - target||^2, optionally min-SNR-gamma weighted (Hang et al. 2023)."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, t)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weights).mean()


def collate(samples: list[dict]) -> dict:
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], np.ndarray):
            out[key] = torch.from_numpy(np.stack(values))
        elif torch.is_tensor(values[0]):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
