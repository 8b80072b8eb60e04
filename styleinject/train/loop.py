"""One accelerate training loop for every kind (finetune, distill, dreambooth) and for LoRA.

A kind module (finetune.py, distill.py, dreambooth.py) supplies ``build(ctx) -> Task``: a dataset
and a batch -> loss function. Everything else lives here, in the phases of diffusers'
``train_dreambooth_lora.py``: load models / optimizer / data / train / save. Only the adapter's
parameters are trained (``adapter_parameters``); the base model is frozen, and under mixed
precision the trainable parameters stay in fp32.

Resume is exact: a checkpoint holds the adapter, the AdamW state, every RNG state and the position
in the data order, so N steps straight and k steps + resume to N give the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from styleinject.adapters import StyleInjectConfig, adapter_parameters, inject, load_adapter, save_adapter
from styleinject.train import checkpoint as ckpt
from styleinject.train.data import (
    KINDS,
    MAX_EXTRACT_BYTES,
    MAX_EXTRACT_FILES,
    EpochSampler,
    LoadedDataset,
    load_dataset,
)

logger = logging.getLogger("styleinject.train")

CONFIG_RECORD = "train_config.json"
# Fields a resumed run must share with the run that wrote the checkpoint (the rest, e.g. steps,
# checkpoint/validation cadence or mixed precision, may change between runs).
_RESUME_FIXED = ("kind", "base_model", "teacher_model", "adapter", "adapter_name", "seed", "resolution",
                 "batch_size", "gradient_accumulation_steps", "learning_rate", "lr_warmup_steps",
                 "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
                 "snr_gamma", "center_crop", "random_flip", "distill_text", "feat_kd_weight",
                 "feat_kd_blocks", "instance_prompt", "class_prompt", "num_class_images", "prior_loss_weight")


class TrainingError(Exception):
    """A run that cannot start or continue; the message says what to change."""


@dataclass
class TrainConfig:
    kind: str
    base_model: str
    data: str
    output_dir: str
    steps: int
    resolution: int | None = None  # None: the base model's native size (native_resolution)
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0  # linear warm-up, then constant
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None  # min-SNR weighting (5.0 is the paper's value); None = off
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # 0 keeps all
    resume: str | None = None  # None | "latest" | a checkpoint folder
    validation_every: int = 0  # 0 = off
    validation_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 30  # Euler Ancestral steps for validation, teacher samples, class images
    guidance_scale: float = 7.5
    center_crop: bool = True
    random_flip: bool = False
    skip_bad: bool = False
    max_dataset_bytes: int = MAX_EXTRACT_BYTES
    max_dataset_files: int = MAX_EXTRACT_FILES
    adapter: StyleInjectConfig = field(default_factory=StyleInjectConfig)
    adapter_name: str = "default"
    # distill
    teacher_model: str | None = None
    distill_text: str = "auto"  # "auto" | "shared" | "unshared" (auto: unshared iff data has teacher_text)
    feat_kd_weight: float = 1.0
    feat_kd_blocks: list[str] = field(default_factory=lambda: ["down_blocks.1", "mid_block", "up_blocks.0"])
    # dreambooth
    instance_prompt: str | None = None
    class_prompt: str | None = None  # set to enable prior preservation
    class_data: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["adapter"] = self.adapter.to_dict()
        return json.loads(json.dumps(out))  # JSON-safe copies

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        adapter = data.get("adapter")
        if isinstance(adapter, dict):
            data["adapter"] = StyleInjectConfig.from_dict(adapter)
        return cls(**data)

    def check(self) -> None:
        """Raise TrainingError naming the first bad setting and the fix."""
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.steps < 1:
            problems.append(f"--steps must be >= 1 (got {self.steps})")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            problems.append(f"--resolution must be a positive multiple of 8 (got {self.resolution})")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            problems.append("--batch-size and --grad-accum must be >= 1")
        if not self.learning_rate > 0:
            problems.append(f"--lr must be > 0 (got {self.learning_rate})")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"--mixed-precision must be no, fp16 or bf16 (got {self.mixed_precision!r})")
        if self.checkpoint_every < 0 or self.validation_every < 0:
            problems.append("--checkpoint-every and --validation-every must be >= 0")
        if self.validation_every and not self.validation_prompts:
            problems.append("--validation-every needs at least one --validation-prompt")
        if self.kind == "distill":
            if not self.teacher_model:
                problems.append("distill needs --teacher-model (a diffusers pipeline folder or hub id)")
            if self.distill_text not in ("auto", "shared", "unshared"):
                problems.append(f"distill_text must be auto, shared or unshared (got {self.distill_text!r})")
        if self.kind == "dreambooth":
            if not self.instance_prompt:
                problems.append("dreambooth needs --instance-prompt (e.g. 'a photo of sks dog')")
            if self.class_data and not self.class_prompt:
                problems.append("--class-data needs --class-prompt (e.g. 'a photo of a dog')")
            if self.class_prompt and self.num_class_images < 1:
                problems.append("--num-class-images must be >= 1 with --class-prompt")
        if problems:
            raise TrainingError("; ".join(problems))


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    lr: float
    samples_per_s: float
    eta_s: float


@dataclass
class TrainResult:
    output_dir: Path
    steps_done: int
    cancelled: bool
    loss: float | None
    checkpoints: list[Path]


@dataclass
class Models:
    """The student pipeline's parts. ``unet`` is the model being trained (accelerate-prepared)."""

    pipe: Any  # StableDiffusionPipeline (Euler Ancestral), for validation and sampling
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any  # DDPMScheduler: forward noising and targets
    weight_dtype: torch.dtype


@dataclass
class TrainContext:
    cfg: TrainConfig
    accelerator: Any
    models: Models
    data: LoadedDataset
    generator: torch.Generator  # all training noise comes from here (saved in checkpoints)
    output_dir: Path

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Task(Protocol):
    dataset: Any  # len() and get(index, aug_seed) -> dict of arrays / strings

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...


# ----------------------------------------------------------------------------------------------
# Shared pieces the kinds use
# ----------------------------------------------------------------------------------------------


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        return text_encoder(ids)[0]


def encode_images(ctx: TrainContext, pixel_values: torch.Tensor) -> torch.Tensor:
    vae = ctx.models.vae
    pixel_values = pixel_values.to(ctx.device, dtype=vae.dtype)
    with torch.no_grad():
        dist = vae.encode(pixel_values).latent_dist
    # z ~ N(mean, std) with our generator (the VAE's own sample() would use the global RNG)
    noise = torch.randn(dist.mean.shape, generator=ctx.generator, device=ctx.device, dtype=dist.mean.dtype)
    latents = dist.mean + dist.std * noise
    return latents * vae.config.scaling_factor


def add_noise(ctx: TrainContext, latents: torch.Tensor):
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1}; returns (z_t, eps, t)."""
    sched = ctx.models.noise_scheduler
    latents = latents.to(ctx.device, dtype=torch.float32)
    noise = torch.randn(latents.shape, generator=ctx.generator, device=ctx.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=ctx.generator,
                      device=ctx.device).long()
    return sched.add_noise(latents, noise, t), noise, t


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":  # v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0
        return noise_scheduler.get_velocity(latents.float(), noise, t)
    raise TrainingError(f"scheduler prediction_type {kind!r} is not supported; use epsilon or v_prediction")


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


def load_models(cfg: TrainConfig, device, weight_dtype) -> Models:
    from diffusers import DDPMScheduler

    from styleinject.pipeline import load_pipeline

    try:
        pipe = load_pipeline(cfg.base_model, device=device, dtype=weight_dtype)
        noise_scheduler = DDPMScheduler.from_pretrained(cfg.base_model, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise TrainingError(f"--base-model {cfg.base_model}: cannot load it ({_first_line(exc)}); pass a "
                            "diffusers Stable Diffusion folder or hub id") from None
    for module in (pipe.text_encoder, pipe.vae, pipe.unet):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return Models(pipe=pipe, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                  unet=pipe.unet, noise_scheduler=noise_scheduler, weight_dtype=weight_dtype)


def _native_resolution(base_model: str) -> int:
    from styleinject.pipeline import native_resolution

    try:
        return native_resolution(base_model)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"--base-model {base_model}: cannot read its unet/vae configs ({_first_line(exc)}); "
                            "pass a diffusers Stable Diffusion folder or hub id, or set --resolution") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    # Accelerator state is a process-wide singleton; a long-lived worker may train runs with other
    # mixed-precision settings one after the other, which accelerate refuses unless reset.
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != cfg.mixed_precision and not PartialState().use_distributed:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps)


def _kind_module(kind: str):
    import importlib

    return importlib.import_module(f"styleinject.train.{kind}")


def training_metadata(cfg: TrainConfig, data_sha256: str, steps: int) -> dict[str, str]:
    """The string metadata stored in the adapter's safetensors header."""
    import styleinject

    meta = {"kind": cfg.kind, "base_model": cfg.base_model, "steps": str(steps), "seed": str(cfg.seed),
            "data_sha256": data_sha256, "resolution": str(cfg.resolution),
            "learning_rate": repr(cfg.learning_rate), "batch_size": str(cfg.batch_size),
            "gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
            "adapter_variant": "lora" if _is_lora(cfg.adapter) else "styleinject",
            "styleinject_version": styleinject.__version__}
    if cfg.teacher_model:
        meta["teacher_model"] = cfg.teacher_model
    return meta


def _is_lora(adapter: StyleInjectConfig) -> bool:
    """No layer gets a style router or STA: plain low rank."""
    styled = adapter.dma and adapter.num_styles > 1
    return not adapter.style_modules or (not styled and not adapter.sta)


def _check_resume_compatible(saved: dict, cfg: TrainConfig, data_sha: str, where: Path) -> None:
    now = cfg.to_dict()
    diffs = [k for k in _RESUME_FIXED if saved["config"].get(k) != now.get(k)]
    if saved.get("data_sha256") != data_sha:
        diffs.append("data (content changed)")
    if diffs:
        raise TrainingError(f"{where}: cannot resume, these settings differ from the run that wrote it: "
                            f"{', '.join(diffs)}; use the same flags or a new --output")


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def run_training(cfg: TrainConfig, progress: Callable[[Progress], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> TrainResult:
    """Train an adapter as ``cfg`` says; see docs/training.md. Raises ``DatasetError`` (bad data)
    or ``TrainingError`` (bad settings) before any model is loaded."""
    from accelerate.utils import set_seed

    cfg.check()
    if cfg.resolution is None:
        cfg = replace(cfg, resolution=_native_resolution(cfg.base_model))
    out = Path(cfg.output_dir)
    resume_from = _resume_target(cfg, out)

    # -- data: validate everything before loading any model ---------------------------------
    work = out / ".work"  # extracted archives; removed when the run ends
    try:
        data = load_dataset(cfg.data, cfg.kind, workdir=work, skip_bad=cfg.skip_bad,
                            max_bytes=cfg.max_dataset_bytes, max_files=cfg.max_dataset_files)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if data.info.num_skipped:
        logger.warning("skipped %d bad item(s): %s", data.info.num_skipped, "; ".join(data.info.skipped[:5]))
    if cfg.kind == "distill" and cfg.distill_text == "unshared" and not data.info.has_teacher_text:
        raise TrainingError(f"{cfg.data}: distill_text=unshared needs a teacher_text for every item "
                            "(metadata.jsonl or prompts .jsonl)")
    resume_state = None
    if resume_from is not None:
        try:
            resume_state = ckpt.read_state(resume_from)
        except (ValueError, OSError) as exc:
            raise TrainingError(f"{resume_from}: unreadable checkpoint ({_first_line(exc)}); resume from "
                                "another one or start a new --output") from None
        _check_resume_compatible(resume_state, cfg, data.info.sha256, resume_from)

    accelerator = _make_accelerator(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        ckpt.remove_partial(out)
        (out / CONFIG_RECORD).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    set_seed(cfg.seed)
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + accelerator.process_index)

    # -- 1. load models, inject the adapter ---------------------------------------------------
    weight_dtype = _weight_dtype(cfg.mixed_precision)
    models = load_models(cfg, accelerator.device, weight_dtype)
    unet = models.unet
    inject(unet, cfg.adapter, cfg.adapter_name)
    params = adapter_parameters(unet, cfg.adapter_name)
    for p in params:  # trainable parameters in fp32 under mixed precision
        p.data = p.data.float()
    param_names = [n for n, p in unet.named_parameters() if p.requires_grad]
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ctx = TrainContext(cfg=cfg, accelerator=accelerator, models=models, data=data, generator=generator,
                       output_dir=out)
    # kind-specific set-up (teacher, cached teacher samples, class images) before the RNG restore
    with torch.random.fork_rng(devices=[]):
        task = _kind_module(cfg.kind).build(ctx)

    # -- 2. optimizer --------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    models.unet = unet

    # -- 3. data order -------------------------------------------------------------------------
    sampler = EpochSampler(len(task.dataset), cfg.seed)
    per_step = cfg.batch_size * accelerator.num_processes

    # -- resume: adapter weights, optimizer state, RNG states, data position --------------------
    step = 0
    if resume_state is not None:
        try:
            load_adapter(accelerator.unwrap_model(unet), resume_from, cfg.adapter_name)
            ckpt.load_optimizer(optimizer, param_names, resume_from)
            ckpt.load_rng(generator, resume_from, accelerator.process_index)
            ckpt.restore_python_rng(resume_state["rng"])
            sampler.load_state_dict(resume_state["data_order"])
        except (ValueError, KeyError, OSError) as exc:
            raise TrainingError(f"{resume_from}: cannot resume from this checkpoint ({_first_line(exc)}); "
                                "resume from another one or start a new --output") from None
        step = int(resume_state["step"])
        logger.info("resumed from %s at step %d", resume_from, step)

    # -- 4. train ------------------------------------------------------------------------------
    unet.train()
    cancelled = False
    last_loss: float | None = resume_state.get("loss") if resume_state else None
    last_saved = step if resume_state is not None else -1
    started, steps_this_run = time.perf_counter(), 0
    while step < cfg.steps:
        if should_cancel is not None and accelerator.is_main_process and should_cancel():
            accelerator.set_trigger()
        if accelerator.check_trigger():
            cancelled = True
            break
        lr = cfg.learning_rate
        if cfg.lr_warmup_steps:  # linear warm-up, then constant
            lr *= min(1.0, (step + 1) / cfg.lr_warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for _ in range(cfg.gradient_accumulation_steps):
            draws = sampler.next(per_step)
            mine = draws[accelerator.process_index * cfg.batch_size:(accelerator.process_index + 1) * cfg.batch_size]
            batch = collate([task.dataset.get(i, aug) for i, aug in mine])
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    loss, _logs = task.loss(batch)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} at step {step + 1}; lower --lr or use "
                                        "--mixed-precision bf16/no")
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        step += 1
        steps_this_run += 1
        last_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
        if progress is not None and accelerator.is_main_process:
            elapsed = time.perf_counter() - started
            per_s = steps_this_run / elapsed if elapsed > 0 else 0.0
            progress(Progress(step=step, total=cfg.steps, loss=last_loss, lr=lr,
                              samples_per_s=per_s * per_step * cfg.gradient_accumulation_steps,
                              eta_s=(cfg.steps - step) / per_s if per_s else math.inf))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            _save_checkpoint(ctx, unet, optimizer, param_names, sampler, step, last_loss)
            last_saved = step
        if cfg.validation_every and step % cfg.validation_every == 0:
            _validate(ctx, unet, step)

    # -- 5. save ---------------------------------------------------------------------------------
    if last_saved != step:
        _save_checkpoint(ctx, unet, optimizer, param_names, sampler, step, last_loss)
    if not cancelled and accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(unet), out, cfg.adapter_name,
                     metadata=training_metadata(cfg, data.info.sha256, step))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)  # extracted archives (a resumed run re-extracts)
    _release(task, models, accelerator)
    return TrainResult(output_dir=out, steps_done=step, cancelled=cancelled, loss=last_loss,
                       checkpoints=ckpt.list_checkpoints(out))


def _resume_target(cfg: TrainConfig, out: Path) -> Path | None:
    existing = ckpt.latest_checkpoint(out)
    if cfg.resume is None:
        if existing is not None:
            raise TrainingError(f"{out} already holds checkpoints (newest {existing.name}); pass "
                                "--resume latest to continue that run or choose an empty --output")
        return None
    if cfg.resume == "latest":
        if existing is None:
            logger.info("no checkpoint in %s: starting a new run", out)
        return existing
    path = Path(cfg.resume)
    if not (path / ckpt.STATE_NAME).is_file():
        raise TrainingError(f"--resume {cfg.resume}: not a checkpoint folder (no {ckpt.STATE_NAME}); pass "
                            "'latest' or a checkpoints/step-NNNNNN folder")
    return path


def _save_checkpoint(ctx: TrainContext, unet, optimizer, param_names, sampler, step, loss) -> Path:
    acc, cfg, out = ctx.accelerator, ctx.cfg, ctx.output_dir
    tmp = ckpt.tmp_dir(out, step)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    ckpt.save_rng(ctx.generator, tmp, acc.process_index)
    final = out / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_name(step)
    if acc.is_main_process:
        save_adapter(acc.unwrap_model(unet), tmp, cfg.adapter_name,
                     metadata={**training_metadata(cfg, ctx.data.info.sha256, step), "checkpoint": "true"})
        ckpt.save_optimizer(optimizer, param_names, tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.write_state(tmp, {"step": step, "loss": loss, "data_order": sampler.state_dict(),
                               "rng": ckpt.python_rng_state(), "data_sha256": ctx.data.info.sha256,
                               "num_processes": acc.num_processes, "config": cfg.to_dict()})
        final = ckpt.finalize(out, step)
        ckpt.prune_checkpoints(out, cfg.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def _validate(ctx: TrainContext, unet, step: int) -> None:
    """Sample the validation prompts with the adapter; images go to validation/step-NNNNNN/."""
    if not ctx.accelerator.is_main_process:
        return
    from styleinject.pipeline import generate

    cfg = ctx.cfg
    folder = ctx.output_dir / "validation" / ckpt.checkpoint_name(step)
    folder.mkdir(parents=True, exist_ok=True)
    model = ctx.accelerator.unwrap_model(unet)
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), ctx.accelerator.autocast():
            for i, prompt in enumerate(cfg.validation_prompts):
                image = generate(ctx.models.pipe, prompt, seed=cfg.seed + i, steps=cfg.sample_steps,
                                 guidance_scale=cfg.guidance_scale, width=cfg.resolution,
                                 height=cfg.resolution, adapter=cfg.adapter_name)[0]
                image.save(folder / f"{i:02d}.png")
    finally:
        model.train()


def _release(task, models: Models, accelerator) -> None:
    close = getattr(task, "close", None)
    if close is not None:
        close()
    accelerator.free_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
