"""Load a diffusers Stable Diffusion (1.x, 2.x, XL) pipeline and generate with Euler Ancestral sampling.

Sampling settings left unset (``None``) come from the model: a local pipeline folder may hold
``generation_defaults.json`` (keys ``steps``, ``guidance_scale``, ``width``, ``height``; the toy
base model ships one, it draws at 32 x 32 with guidance 4); otherwise 30 steps, guidance 7.5 and the
UNet's native size (``sample_size`` x the VAE's scale factor: 512 for Stable Diffusion 1.5).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from styleinject.adapters import list_adapters, set_adapter, set_adapter_scale
from styleinject.families import family_for_class, family_of_checkpoint
from styleinject.serving.defaults import (  # noqa: F401 - part of this module's public API
    DEFAULTS_FILE,
    MAX_SIDE,
    check_size,
    generation_defaults,
    read_generation_defaults,
)
from styleinject.serving.engine import engine_for
from styleinject.serving.request import Request
from styleinject.serving.tiers import AdapterRef


def load_pipeline(base_model: str | Path, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, config: str | Path | None = None):
    """A Stable Diffusion 1.x/2.x or SDXL pipeline with an Euler Ancestral scheduler.

    ``base_model`` is a hub id, a diffusers pipeline folder (its ``model_index.json`` names the
    pipeline class: ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``), or a single-file
    ``.safetensors`` checkpoint in the original (LDM / SGM) key layout, loaded with diffusers'
    ``from_single_file``; its family comes from its keys. A single file holds weights only: the
    configs and tokenizers come from ``config`` (a diffusers folder of the same architecture,
    weights not needed), else from a folder ``<name>.config/`` beside the file, else from the
    hugging face cache of the hub model diffusers infers for it; loading never downloads.

    ``device`` defaults to CUDA when available; ``dtype`` to float16 on CUDA, float32 on CPU.
    """
    import diffusers
    from diffusers import EulerAncestralDiscreteScheduler

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    local = Path(str(base_model)).expanduser()
    if local.is_file():
        family, config_dir = single_file_config(local, config)
        pipe = getattr(diffusers, family.pipeline_class).from_single_file(
            str(local), config=str(config_dir), local_files_only=True, **_dtype_kwarg(dtype),
            **family.pipeline_kwargs)
        defaults_from = config_dir
    else:
        if local.exists() and not (local / "model_index.json").is_file():
            raise FileNotFoundError(f"{local} is not a diffusers pipeline folder (no model_index.json); pass a "
                                    "folder saved with save_pretrained, a .safetensors checkpoint or a hub id")
        source = str(local) if local.exists() else str(base_model)
        family = family_for_class(diffusers.DiffusionPipeline.load_config(source)["_class_name"])
        pipe = getattr(diffusers, family.pipeline_class).from_pretrained(source, **_dtype_kwarg(dtype),
                                                                         **family.pipeline_kwargs)
        defaults_from = local if local.exists() else None
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.unet.eval()
    pipe._styleinject_defaults = read_generation_defaults(defaults_from) if defaults_from is not None else {}
    return pipe


def single_file_config(path: str | Path, config: str | Path | None = None):
    """(family, config folder) for a single-file checkpoint; see ``load_pipeline``. Raises
    ``FileNotFoundError`` naming the fixes when the configs would have to be downloaded."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints must be .safetensors (other formats are pickles, "
                         "which are never loaded)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for a torn or foreign file
        raise ValueError(f"{path}: not a readable .safetensors file ({exc})") from None
    family = family_of_checkpoint(keys)
    sidecar = path.with_suffix(".config")
    if config is None and (sidecar / "model_index.json").is_file():
        config = sidecar
    if config is None:
        config = _cached_hub_config(path, family, sidecar)
    config = Path(config)
    if not (config / "model_index.json").is_file():
        raise FileNotFoundError(f"config {config} is not a diffusers pipeline folder (no model_index.json)")
    import diffusers

    found = diffusers.DiffusionPipeline.load_config(str(config))["_class_name"]
    if found != family.pipeline_class:
        raise ValueError(f"{path} is a {family.pipeline_class} checkpoint but its config folder {config} is a "
                         f"{found}: give a config folder of the checkpoint's architecture")
    return family, config


def _cached_hub_config(path: Path, family, sidecar: Path) -> str:
    """The configs of the hub model diffusers would fetch for this checkpoint, from the local hugging
    face cache only (diffusers itself would fall back to downloading them)."""
    from diffusers.loaders.single_file import _download_diffusers_model_config_from_hub
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_DEFAULT_PIPELINE_PATHS,
        infer_diffusers_model_type,
        load_single_file_checkpoint,
    )
    from huggingface_hub.utils import LocalEntryNotFoundError

    model_type = infer_diffusers_model_type(load_single_file_checkpoint(str(path)))
    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    fixes = f"put a diffusers folder of the same architecture (configs and tokenizers suffice) at {sidecar}"
    # diffusers recognises a checkpoint by a few keys of the full-size models and falls back to SD 1.5:
    # suggest its hub model only when that agrees with the family read from the keys
    if model_type.startswith("xl") == (family.pipeline_class == "StableDiffusionXLPipeline"):
        try:
            return _download_diffusers_model_config_from_hub(repo, cache_dir=None, revision=None, proxies=None,
                                                             local_files_only=True)
        except LocalEntryNotFoundError:
            fixes += (f" (e.g. {repo}'s), or cache {repo}'s configs once "
                      f"(hf download {repo} --include '*.json' '*.txt')")
    raise FileNotFoundError(f"{path} is a single-file {family.pipeline_class} checkpoint, whose configs and "
                            f"tokenizers are not in the file: {fixes}, or pass config=FOLDER to load_pipeline; "
                            "nothing is downloaded at load time")


def native_resolution(base_model: str | Path) -> int:
    """The side the model draws at by default (``generation_defaults(pipe)["width"]``), read from
    its configs without loading any weights: 512 for Stable Diffusion 1.5, 1024 for SDXL, 32 for the
    toy model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    local = Path(str(base_model)).expanduser()
    if local.is_file():
        local = single_file_config(local)[1]
    source = str(local) if local.exists() else str(base_model)
    if local.exists():
        width = read_generation_defaults(local).get("width")
        if width:
            return int(width)
    unet = UNet2DConditionModel.load_config(source, subfolder="unet")
    vae = AutoencoderKL.load_config(source, subfolder="vae")
    size = unet["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size * 2 ** (len(vae["block_out_channels"]) - 1))


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    # diffusers renamed torch_dtype to dtype (0.36+) and warns on the old name
    import diffusers.utils.deprecation_utils as deprecation

    return {"dtype": dtype} if hasattr(deprecation, "_resolve_dtype") else {"torch_dtype": dtype}


def generate(pipe, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
             seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
             width: int | None = None, height: int | None = None, num_images: int = 1,
             adapter: str | Path | list[str | Path | None] | None = None,
             adapter_scale: float | list[float] = 1.0,
             progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
    """Generate ``num_images`` images per prompt with Euler Ancestral sampling.

    ``adapter`` is a saved adapter folder or the name of an adapter already loaded into
    ``pipe.unet``; ``None`` runs the base model, giving exactly diffusers' image for the same seed.
    A list of folders (``None`` entries allowed), one per prompt, runs a mixed batch: each prompt
    with its own adapter (and ``adapter_scale`` may then be a list too).
    ``progress(step, total)`` is called after every denoising step. ``steps``, ``guidance_scale``,
    ``width`` and ``height`` left None take ``generation_defaults(pipe)``.

    Folders and ``None`` run on the pipeline's serving engine (``styleinject.serving``), so calls
    from several threads share UNet forwards; a named adapter runs diffusers' pipeline directly.
    """
    engine = engine_for(pipe)
    request = Request(prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                      guidance_scale=guidance_scale, width=width, height=height, num_images=num_images,
                      progress=progress)
    if isinstance(adapter, (str, Path)) and str(adapter) in list_adapters(pipe.unet):
        return _generate_named(pipe, engine, engine.resolve(request), str(adapter), adapter_scale)
    if isinstance(adapter, (list, tuple)):
        prompts = request.prompts
        if len(adapter) != len(prompts):
            raise ValueError(f"{len(adapter)} adapters for {len(prompts)} prompts: give one per prompt "
                             "(None for the base model)")
        scales = adapter_scale if isinstance(adapter_scale, (list, tuple)) else [adapter_scale] * len(prompts)
        request.adapters = [[] if a is None else [_ref(pipe, a, s)] for a, s in zip(adapter, scales, strict=True)]
    elif adapter is not None:
        request.adapters = [_ref(pipe, adapter, adapter_scale)]
    return engine.generate(request)


def _ref(pipe, folder, scale: float) -> AdapterRef:
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"adapter {str(folder)!r} is neither a loaded adapter "
                                f"({list_adapters(pipe.unet)}) nor an adapter folder")
    return AdapterRef(str(folder), float(scale))


def _generate_named(pipe, engine, request: Request, name: str, scale: float) -> list[Image.Image]:
    """diffusers' own pipeline call with a named adapter of ``pipe.unet`` (e.g. while training)."""
    from diffusers import EulerAncestralDiscreteScheduler

    def on_step_end(_pipe, step, _timestep, kwargs):
        if request.progress is not None:
            request.progress(step + 1, request.steps)
        return kwargs

    with engine.lock:  # between two engine steps: the engine never sees this adapter state
        if not isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler):
            pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        set_adapter(pipe.unet, name)
        set_adapter_scale(pipe.unet, name, scale)
        result = pipe(request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
                      guidance_scale=request.guidance_scale, width=request.width, height=request.height,
                      num_images_per_prompt=request.num_images,
                      generator=torch.Generator(device="cpu").manual_seed(request.seed),
                      callback_on_step_end=on_step_end)
    return result.images
