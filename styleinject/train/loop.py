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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from styleinject.adapters import StyleInjectConfig, adapter_parameters, inject, load_adapter, save_adapter
from styleinject.errors import first_line as _first_line
from styleinject.names import TRAIN_KINDS
from styleinject.train import checkpoint as ckpt
from styleinject.train.config import CONFIG_RECORD, TrainConfig, TrainingError, resume_fixed_fields
from styleinject.train.context import Models, Task, TrainContext
from styleinject.train.data import EpochSampler, load_dataset
from styleinject.train.losses import (  # re-exported: the kinds' shared math used to live here
    add_noise,
    collate,
    diffusion_loss,
    diffusion_target,
    encode_images,
    encode_text,
)
from styleinject.train.validation import write_samples

__all__ = ["CONFIG_RECORD", "Models", "Progress", "Task", "TrainConfig", "TrainContext", "TrainResult",
           "TrainingError", "add_noise", "collate", "diffusion_loss", "diffusion_target", "encode_images",
           "encode_text", "run_training", "training_metadata"]

logger = logging.getLogger("styleinject.train")

# Kind modules, found by name so that they and the loop never import each other.
KIND_MODULES = {kind: f"styleinject.train.{kind}" for kind in TRAIN_KINDS}


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    lr: float
    samples_per_s: float
    eta_s: float
    # the terms of a multi-term loss as the kind's loss step names them (distill: loss_out_kd,
    # loss_feat_kd; dreambooth with a class prompt: loss_instance, loss_prior), averaged like
    # ``loss``; empty for a single-term loss
    terms: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    output_dir: Path
    steps_done: int
    cancelled: bool
    loss: float | None
    checkpoints: list[Path]


def load_models(cfg: TrainConfig, device, weight_dtype) -> Models:
    from diffusers import DDPMScheduler

    from styleinject.families import family_of
    from styleinject.pipeline import load_pipeline

    try:
        pipe = load_pipeline(cfg.base_model, device=device, dtype=weight_dtype)
    except (OSError, ValueError) as exc:
        raise TrainingError("{base_model} {path}: cannot load it ({cause}); pass a diffusers Stable Diffusion / "
                            "SDXL folder, a .safetensors checkpoint or a hub id", path=cfg.base_model,
                            cause=_first_line(exc)) from None
    # the training noise schedule is the model's own (betas, prediction type): the pipeline's
    # scheduler config carries it, also for a single-file model that has no scheduler folder
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (*family_of(pipe).text_encoders(pipe), pipe.vae, pipe.unet):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return Models(pipe=pipe, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                  unet=pipe.unet, noise_scheduler=noise_scheduler, weight_dtype=weight_dtype)


def _native_resolution(base_model: str) -> int:
    from styleinject.pipeline import native_resolution

    try:
        return native_resolution(base_model)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError("{base_model} {path}: cannot read its unet/vae configs ({cause}); pass a diffusers "
                            "Stable Diffusion / SDXL folder, a .safetensors checkpoint or a hub id, or set "
                            "{resolution}", path=base_model,
                            cause=_first_line(exc)) from None


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

    return importlib.import_module(KIND_MODULES[kind])


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
    diffs = ["{%s}" % k for k in resume_fixed_fields() if saved["config"].get(k) != now.get(k)]
    if saved.get("data_sha256") != data_sha:
        diffs.append("{data} (content changed)")
    if diffs:  # the differing fields are placeholders, so each front end names them its way
        raise TrainingError("{path}: cannot resume, these settings differ from the run that wrote it: "
                            + ", ".join(diffs) + "; use the same settings or a new {output_dir}", path=where)


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
        raise TrainingError("{path}: {distill_text}=unshared needs a teacher_text for every item "
                            "(metadata.jsonl or prompts .jsonl)", path=cfg.data)
    resume_state = None
    if resume_from is not None:
        try:
            resume_state = ckpt.read_state(resume_from)
        except (ValueError, OSError) as exc:
            raise TrainingError("{path}: unreadable checkpoint ({cause}); resume from another one or start a "
                                "new {output_dir}", path=resume_from, cause=_first_line(exc)) from None
        _check_resume_compatible(resume_state, cfg, data.info.sha256, resume_from)

    accelerator = _make_accelerator(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        ckpt.remove_partial(out)
        (out / CONFIG_RECORD).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    set_seed(cfg.seed)
    # one noise stream for all data-parallel processes: each keeps its rows of the global draw (losses.py)
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed)

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
            raise TrainingError("{path}: cannot resume from this checkpoint ({cause}); resume from another "
                                "one or start a new {output_dir}", path=resume_from, cause=_first_line(exc)) from None
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
        losses, term_logs = [], []
        for _ in range(cfg.gradient_accumulation_steps):
            draws = sampler.next(per_step)
            mine = draws[accelerator.process_index * cfg.batch_size:(accelerator.process_index + 1) * cfg.batch_size]
            batch = collate([task.dataset.get(i, aug) for i, aug in mine])
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    loss, logs = task.loss(batch)
                if not torch.isfinite(loss):
                    raise TrainingError("loss became {value} at step {at}; lower {learning_rate} or use "
                                        "{mixed_precision} bf16/no", value=loss.item(), at=step + 1)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            term_logs.append(logs)
        step += 1
        steps_this_run += 1
        last_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
        terms = _mean_terms(accelerator, term_logs)  # a collective too: every process calls it
        if progress is not None and accelerator.is_main_process:
            elapsed = time.perf_counter() - started
            per_s = steps_this_run / elapsed if elapsed > 0 else 0.0
            progress(Progress(step=step, total=cfg.steps, loss=last_loss, lr=lr,
                              samples_per_s=per_s * per_step * cfg.gradient_accumulation_steps,
                              eta_s=(cfg.steps - step) / per_s if per_s else math.inf,
                              terms=terms))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            _save_checkpoint(ctx, unet, optimizer, param_names, sampler, step, last_loss)
            last_saved = step
        if cfg.validation_every and step % cfg.validation_every == 0:
            write_samples(ctx, unet, out / "validation" / ckpt.checkpoint_name(step))

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


def _mean_terms(accelerator, term_logs: list[dict[str, float]]) -> dict[str, float]:
    """The loss terms the kind's loss step returned, averaged over micro-steps and processes like
    the loss itself; empty when the loss has a single term."""
    names = sorted(set.intersection(*(set(logs) for logs in term_logs))) if term_logs else []
    if len(names) < 2:
        return {}
    local = torch.tensor([[logs[n] for n in names] for logs in term_logs], device=accelerator.device)
    means = accelerator.reduce(local.mean(0), "mean").tolist()
    return dict(zip(names, means))


def _resume_target(cfg: TrainConfig, out: Path) -> Path | None:
    existing = ckpt.latest_checkpoint(out)
    if cfg.resume is None:
        if existing is not None:
            raise TrainingError("{path} already holds checkpoints (newest {newest}); pass {resume} latest to "
                                "continue that run or choose an empty {output_dir}", path=out, newest=existing.name)
        return None
    if cfg.resume == "latest":
        if existing is None:
            logger.info("no checkpoint in %s: starting a new run", out)
        return existing
    path = Path(cfg.resume)
    if not (path / ckpt.STATE_NAME).is_file():
        raise TrainingError("{resume} {path}: not a checkpoint folder (no {state}); pass 'latest' or a "
                            "checkpoints/step-NNNNNN folder", path=cfg.resume, state=ckpt.STATE_NAME)
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
        if cfg.checkpoint_samples:  # before training_state.json: a complete checkpoint has its grid
            write_samples(ctx, unet, tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.write_state(tmp, {"step": step, "loss": loss, "data_order": sampler.state_dict(),
                               "rng": ckpt.python_rng_state(), "data_sha256": ctx.data.info.sha256,
                               "num_processes": acc.num_processes, "config": cfg.to_dict()})
        final = ckpt.finalize(out, step)
        ckpt.prune_checkpoints(out, cfg.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def _release(task, models: Models, accelerator) -> None:
    close = getattr(task, "close", None)
    if close is not None:
        close()
    accelerator.free_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
