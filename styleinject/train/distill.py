"""Distillation: a teacher pipeline's knowledge into an adapter on the student base model.

z_t is the noised latent of a data image (or, for prompts-only data, of the teacher's own sample
for the prompt, generated once and cached in ``<output>/cache/``). With eps_T the teacher and
eps_S the adapted student:

  shared text encoder (both get the student's prompt ``text``):
      L = L_OutKD + lambda * L_FeatKD
      L_OutKD  = E || eps_T(z_t, t, c_T) - eps_S(z_t, t, c_S) ||^2
      L_FeatKD = sum_l E || f_T^l(z_t, t, c_T) - f_S^l(z_t, t, c_S) ||^2
                 over the UNet blocks in ``feat_kd_blocks`` (forward hooks, same names on both)
  unshared text encoders (cross-lingual: the teacher gets ``teacher_text``, the student ``text``):
      L = L_OutKD   (intermediate features of different text conditionings are not comparable)

c_T and c_S come from each pipeline's own tokenizer(s) and text encoder(s) (``styleinject.families``);
teacher and student must be of one model family (SDXL latents and conditioning differ from SD's).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from styleinject.errors import first_line as _first_line
from styleinject.families import family_of
from styleinject.train.config import TrainingError
from styleinject.train.context import TrainContext
from styleinject.train.data import ImageTextDataset
from styleinject.train.losses import add_noise, encode_images, encode_text

CACHE_DIR = "cache"
CACHE_NAME = "teacher_latents.safetensors"
_GEN_BATCH = 4


class FeatureRecorder:
    """Forward hooks that keep the outputs of named sub-modules (first tensor of a tuple)."""

    def __init__(self, model: torch.nn.Module, names: list[str], detach: bool):
        self.features: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                blocks = [n for n, _ in model.named_children() if n.endswith("blocks") or n == "mid_block"]
                examples = [f"{b}.{c}" for b in blocks for c, _ in getattr(model, b).named_children()] \
                    if blocks else []
                raise TrainingError("{feat_kd_blocks}: the UNet has no block {name!r}; use names like {examples}",
                                    name=name, examples=", ".join(examples[:6] + ["mid_block"])) from None
            self.handles.append(module.register_forward_hook(self._hook(name, detach)))

    def _hook(self, name: str, detach: bool):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            elif hasattr(output, "sample"):
                output = output.sample
            self.features[name] = output.detach() if detach else output
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class CachedLatentDataset:
    """Prompts-only data: each item's z_0 is the teacher's cached sample for its prompt."""

    def __init__(self, items, latents: torch.Tensor):
        self.items, self.latents = items, latents

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, aug_seed: int) -> dict:
        item = self.items[index]
        return {"latents": self.latents[index], "text": item.text, "teacher_text": item.teacher_text}


class DistillTask:
    def __init__(self, ctx: TrainContext):
        from styleinject.pipeline import load_pipeline

        cfg, models = ctx.cfg, ctx.models
        self.ctx = ctx
        # -- load the teacher ----------------------------------------------------------------
        try:
            self.teacher = load_pipeline(cfg.teacher_model, device=ctx.device, dtype=models.weight_dtype)
        except (OSError, ValueError) as exc:
            raise TrainingError("{teacher_model} {path}: cannot load it ({cause}); pass a diffusers Stable "
                                "Diffusion / SDXL folder, a .safetensors checkpoint or a hub id", path=cfg.teacher_model, cause=_first_line(exc)) from None
        self.teacher.set_progress_bar_config(disable=True)
        teacher_family, student_family = family_of(self.teacher), family_of(models.pipe)
        for module in (self.teacher.unet, *teacher_family.text_encoders(self.teacher), self.teacher.vae):
            module.requires_grad_(False)
        if teacher_family is not student_family:
            raise TrainingError("teacher {path} is a {teacher} model, the student a {student} one: distil "
                                "between models of one family", path=cfg.teacher_model,
                                teacher=teacher_family.name, student=student_family.name)
        t_unet, s_unet = self.teacher.unet, models.unet
        if t_unet.config.in_channels != s_unet.config.in_channels:
            raise TrainingError("teacher {path} has {teacher} latent channels, the student {student}: distil "
                                "between models of one family", path=cfg.teacher_model,
                                teacher=t_unet.config.in_channels, student=s_unet.config.in_channels)
        t_pred = self.teacher.scheduler.config.get("prediction_type", "epsilon")
        s_pred = models.noise_scheduler.config.prediction_type
        if t_pred != s_pred:
            raise TrainingError("teacher predicts {teacher!r}, the student {student!r}: their outputs are not "
                                "comparable; pick a teacher with the student's prediction type",
                                teacher=t_pred, student=s_pred)
        mode = cfg.distill_text
        if mode == "auto":
            mode = "unshared" if ctx.data.info.has_teacher_text else "shared"
        self.unshared = mode == "unshared"
        # -- feature hooks (shared text encoder only) -----------------------------------------
        self.recorders: list[FeatureRecorder] = []
        self.use_feat = not self.unshared and cfg.feat_kd_weight > 0 and bool(cfg.feat_kd_blocks)
        if self.use_feat:
            self.t_rec = FeatureRecorder(t_unet, cfg.feat_kd_blocks, detach=True)
            self.s_rec = FeatureRecorder(s_unet, cfg.feat_kd_blocks, detach=False)
            self.recorders = [self.t_rec, self.s_rec]
        # -- data: images, or the teacher's cached samples for the prompts --------------------
        items = ctx.data.items
        if items[0].image is not None:
            self.dataset = ImageTextDataset(items, cfg.resolution, center_crop=cfg.center_crop,
                                            random_flip=cfg.random_flip)
        else:
            self.dataset = CachedLatentDataset(items, self._teacher_latents(items))

    def _teacher_latents(self, items) -> torch.Tensor:
        """z_0 for every prompt: the teacher's Euler Ancestral sample, generated once, cached."""
        ctx, cfg = self.ctx, self.ctx.cfg
        path = ctx.output_dir / CACHE_DIR / CACHE_NAME
        key = {"data_sha256": ctx.data.info.sha256, "teacher_model": cfg.teacher_model, "seed": cfg.seed,
               "resolution": cfg.resolution, "sample_steps": cfg.sample_steps,
               "guidance_scale": cfg.guidance_scale, "unshared": self.unshared}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        if ctx.accelerator.is_main_process and _cache_key(path) != digest:
            chunks = []
            for start in range(0, len(items), _GEN_BATCH):
                batch = items[start:start + _GEN_BATCH]
                prompts = [(it.teacher_text if self.unshared else it.text) for it in batch]
                gens = [torch.Generator(device="cpu").manual_seed(cfg.seed + start + i) for i in range(len(batch))]
                with torch.no_grad():
                    out = self.teacher(prompts, num_inference_steps=cfg.sample_steps,
                                       guidance_scale=cfg.guidance_scale, height=cfg.resolution,
                                       width=cfg.resolution, generator=gens, output_type="latent")
                chunks.append(out.images.float().cpu())
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"latents": torch.cat(chunks).contiguous()}, str(tmp), metadata={"key": digest, **{
                k: str(v) for k, v in key.items()}})
            tmp.replace(path)
        ctx.accelerator.wait_for_everyone()
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor("latents")

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ctx, m, teacher = self.ctx, self.ctx.models, self.teacher
        if "latents" in batch:
            latents = batch["latents"].to(ctx.device)
        else:
            latents = encode_images(ctx, batch["pixel_values"])
        noisy, _noise, t = add_noise(ctx, latents)                                      # z_t
        c_s = encode_text(ctx, m.pipe, batch["text"])
        t_prompts = batch["teacher_text"] if self.unshared else batch["text"]
        c_t = encode_text(ctx, teacher, t_prompts)
        with torch.no_grad():
            eps_t = teacher.unet(noisy.to(teacher.unet.dtype), t, **c_t.unet_kwargs()).sample  # eps_T(z_t, t, c_T)
        eps_s = m.unet(noisy, t, **c_s.unet_kwargs()).sample                                 # eps_S(z_t, t, c_S)
        out_kd = F.mse_loss(eps_s.float(), eps_t.float())                               # L_OutKD
        logs = {"loss_out_kd": out_kd.item()}
        if not self.use_feat:
            return out_kd, logs
        feat_kd = 0.0
        for name in ctx.cfg.feat_kd_blocks:                                             # L_FeatKD
            f_s, f_t = self.s_rec.features[name], self.t_rec.features[name]
            if f_s.shape != f_t.shape:
                raise TrainingError("{feat_kd_blocks} {name}: teacher output {teacher} and student output "
                                    "{student} differ; pick blocks with equal shapes or {feat_kd_weight} 0",
                                    name=name, teacher=tuple(f_t.shape), student=tuple(f_s.shape))
            feat_kd = feat_kd + F.mse_loss(f_s.float(), f_t.float())
        self.s_rec.features.clear()
        self.t_rec.features.clear()
        logs["loss_feat_kd"] = float(feat_kd.detach())
        return out_kd + ctx.cfg.feat_kd_weight * feat_kd, logs

    def close(self) -> None:
        for rec in self.recorders:
            rec.close()
        self.teacher = None


def _cache_key(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("key")
    except Exception:  # a torn or foreign file: regenerate
        return None


def build(ctx: TrainContext) -> DistillTask:
    return DistillTask(ctx)
