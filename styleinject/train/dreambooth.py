"""DreamBooth: instance images with one identifier prompt (e.g. "a photo of sks dog"), and optional
prior preservation with class images (e.g. "a photo of a dog"):

  L = E || eps - eps_theta(z_t, t, c_inst) ||^2 + prior_loss_weight * E || eps' - eps_theta(z'_t, t', c_class) ||^2

Class images come from ``class_data``; when it holds fewer than ``num_class_images`` (or is not
given) the base model (adapters off) generates the rest into ``<output>/class_images/``, once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from styleinject.train.context import TrainContext
from styleinject.train.losses import add_noise, diffusion_loss, diffusion_target, encode_images, encode_text
from styleinject.train.data import IMAGE_EXTENSIONS, ImageTextDataset, Item, load_dataset

CLASS_DIR = "class_images"


class DreamBoothDataset:
    """Instance image i (and class image i, cycling the shorter set), like diffusers' example."""

    def __init__(self, instance: ImageTextDataset, prior: ImageTextDataset | None):
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior)) if self.prior is not None else len(self.instance)

    def get(self, index: int, aug_seed: int) -> dict:
        out = {"pixel_values": self.instance.image(index % len(self.instance), aug_seed)}
        if self.prior is not None:
            out["class_pixel_values"] = self.prior.image(index % len(self.prior), aug_seed)
        return out


class DreamBoothTask:
    def __init__(self, ctx: TrainContext):
        cfg = ctx.cfg
        self.ctx = ctx
        opts = {"center_crop": cfg.center_crop, "random_flip": cfg.random_flip}
        instance = ImageTextDataset(ctx.data.items, cfg.resolution, **opts)
        prior = None
        if cfg.class_prompt:
            prior = ImageTextDataset(self._class_items(), cfg.resolution, **opts)
        self.dataset = DreamBoothDataset(instance, prior)

    def _class_items(self) -> list[Item]:
        ctx, cfg = self.ctx, self.ctx.cfg
        items: list[Item] = []
        if cfg.class_data:
            given = load_dataset(cfg.class_data, "dreambooth", workdir=ctx.output_dir / ".work" / "class",
                                 skip_bad=cfg.skip_bad, max_bytes=cfg.max_dataset_bytes,
                                 max_files=cfg.max_dataset_files)
            items = given.items[: cfg.num_class_images]
        missing = cfg.num_class_images - len(items)
        folder = ctx.output_dir / CLASS_DIR
        if missing > 0:
            if ctx.accelerator.is_main_process:
                self._generate(folder, missing)
            ctx.accelerator.wait_for_everyone()
            items += [Item(name=p.name, image=p, text=cfg.class_prompt) for p in _class_files(folder)[:missing]]
        return items

    def _generate(self, folder: Path, count: int) -> None:
        """Class images from the base model (adapters off); image i uses seed + i, so a run that
        stopped half-way continues where it left off."""
        from styleinject.pipeline import generate

        ctx, cfg = self.ctx, self.ctx.cfg
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = folder / f"class-{i:05d}.png"
            if path.is_file():
                continue
            image = generate(ctx.models.pipe, cfg.class_prompt, seed=cfg.seed + i, steps=cfg.sample_steps,
                             guidance_scale=cfg.guidance_scale, width=cfg.resolution,
                             height=cfg.resolution, adapter=None)[0]
            tmp = path.with_name(f".{path.name}.tmp.png")
            image.save(tmp)
            tmp.replace(path)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ctx, m, cfg = self.ctx, self.ctx.models, self.ctx.cfg
        pixels = batch["pixel_values"]
        prompts = [cfg.instance_prompt] * len(pixels)
        prior = "class_pixel_values" in batch
        if prior:
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            prompts += [cfg.class_prompt] * len(batch["class_pixel_values"])
        latents = encode_images(ctx, pixels)
        noisy, noise, t = add_noise(ctx, latents)
        cond = encode_text(ctx, m.pipe, prompts)
        pred = m.unet(noisy, t, **cond.unet_kwargs()).sample
        target = diffusion_target(m.noise_scheduler, latents, noise, t)
        if not prior:
            loss = diffusion_loss(pred, target, t, m.noise_scheduler, cfg.snr_gamma)
            return loss, {"loss_instance": loss.item()}
        n = len(batch["pixel_values"])
        inst = diffusion_loss(pred[:n], target[:n], t[:n], m.noise_scheduler, cfg.snr_gamma)
        prior_loss = diffusion_loss(pred[n:], target[n:], t[n:], m.noise_scheduler, cfg.snr_gamma)
        return inst + cfg.prior_loss_weight * prior_loss, {"loss_instance": inst.item(),
                                                           "loss_prior": prior_loss.item()}


def _class_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def build(ctx: TrainContext) -> DreamBoothTask:
    return DreamBoothTask(ctx)
