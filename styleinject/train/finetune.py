"""Fine-tuning: image-text pairs, L_task = E_{z_0, c, eps, t} || eps - eps_theta(z_t, t, c) ||^2
(or the v-prediction target when the base model's scheduler says ``prediction_type="v_prediction"``),
optionally min-SNR weighted."""

from __future__ import annotations

import torch

from styleinject.train.context import TrainContext
from styleinject.train.losses import add_noise, diffusion_loss, diffusion_target, encode_images, encode_text
from styleinject.train.data import ImageTextDataset


class FinetuneTask:
    def __init__(self, ctx: TrainContext):
        cfg = ctx.cfg
        self.ctx = ctx
        self.dataset = ImageTextDataset(ctx.data.items, cfg.resolution, center_crop=cfg.center_crop,
                                        random_flip=cfg.random_flip)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ctx, m = self.ctx, self.ctx.models
        latents = encode_images(ctx, batch["pixel_values"])                     # z_0 = E(x)
        noisy, noise, t = add_noise(ctx, latents)                                # z_t
        cond = encode_text(ctx, m.pipe, batch["text"])                           # c = tau(y)
        pred = m.unet(noisy, t, **cond.unet_kwargs()).sample                     # eps_theta(z_t, t, c)
        target = diffusion_target(m.noise_scheduler, latents, noise, t)
        loss = diffusion_loss(pred, target, t, m.noise_scheduler, ctx.cfg.snr_gamma)
        return loss, {"loss_task": loss.item()}


def build(ctx: TrainContext) -> FinetuneTask:
    return FinetuneTask(ctx)
