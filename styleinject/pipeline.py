"""Load a diffusers Stable Diffusion pipeline and generate with Euler Ancestral sampling.

Sampling settings left unset (``None``) come from the model: a local pipeline folder may hold
``generation_defaults.json`` (keys ``steps``, ``guidance_scale``, ``width``, ``height``; the toy
base model ships one, it draws at 32 x 32 with guidance 4); otherwise 30 steps, guidance 7.5 and the
UNet's native size (``sample_size`` x the VAE's scale factor: 512 for Stable Diffusion 1.5).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image

from styleinject.adapters import list_adapters, mixed_adapters, set_adapter, set_adapter_scale
from styleinject.adapters.bank import AdapterBank

MAX_SIDE = 2048
DEFAULTS_FILE = "generation_defaults.json"
_DEFAULT_KEYS = {"steps": int, "guidance_scale": float, "width": int, "height": int}


def load_pipeline(base_model: str | Path, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None):
    """A ``StableDiffusionPipeline`` from a hub id or local folder, with an Euler Ancestral scheduler.

    ``device`` defaults to CUDA when available; ``dtype`` to float16 on CUDA, float32 on CPU.
    """
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    local = Path(str(base_model)).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise FileNotFoundError(f"{local} is not a diffusers pipeline folder (no model_index.json); "
                                "pass a folder saved with save_pretrained or a hub id")
    source = str(local) if local.exists() else str(base_model)
    pipe = StableDiffusionPipeline.from_pretrained(source, **_dtype_kwarg(dtype), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.unet.eval()
    pipe._styleinject_defaults = read_generation_defaults(local) if local.exists() else {}
    return pipe


def read_generation_defaults(folder: str | Path) -> dict:
    """The sampling settings a model folder recommends (``generation_defaults.json``), checked."""
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix or delete the file") from None
    if not isinstance(data, dict) or set(data) - set(_DEFAULT_KEYS):
        raise ValueError(f"{path}: expected an object with keys among {sorted(_DEFAULT_KEYS)}")
    for key, kind in _DEFAULT_KEYS.items():
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], (int, float))
                            or data[key] <= 0 or (kind is int and data[key] != int(data[key]))):
            raise ValueError(f"{path}: {key} must be a positive {kind.__name__}, got {data[key]!r}")
    return {key: _DEFAULT_KEYS[key](value) for key, value in data.items()}


def generation_defaults(pipe) -> dict:
    """steps, guidance_scale, width and height used when ``generate`` is given None."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    native = native[0] if isinstance(native, (list, tuple)) else native
    return {"steps": 30, "guidance_scale": 7.5, "width": int(native), "height": int(native),
            **getattr(pipe, "_styleinject_defaults", {})}


def native_resolution(base_model: str | Path) -> int:
    """The side the model draws at by default (``generation_defaults(pipe)["width"]``), read from
    its configs without loading any weights: 512 for Stable Diffusion 1.5, 32 for the toy model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    local = Path(str(base_model)).expanduser()
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


def adapter_bank(pipe) -> AdapterBank:
    """The pipeline's bank of resident adapters (created on first use)."""
    bank = getattr(pipe, "_styleinject_bank", None)
    if bank is None:
        bank = AdapterBank(pipe.unet)
        pipe._styleinject_bank = bank
    return bank


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
    """
    from diffusers import EulerAncestralDiscreteScheduler

    defaults = generation_defaults(pipe)
    steps = defaults["steps"] if steps is None else steps
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    width = defaults["width"] if width is None else width
    height = defaults["height"] if height is None else height
    _check_size(width, height, pipe.vae_scale_factor)
    if steps < 1 or num_images < 1:
        raise ValueError(f"steps and num_images must be >= 1 (got {steps}, {num_images})")
    if not isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler):
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)

    def on_step_end(_pipe, step, _timestep, kwargs):
        if progress is not None:
            progress(step + 1, steps)
        return kwargs

    bank = adapter_bank(pipe)
    with bank.lock:
        if isinstance(adapter, (list, tuple)):
            context = _mixed_batch(pipe, bank, prompt, adapter, adapter_scale, num_images)
        elif adapter is not None and str(adapter) in list_adapters(pipe.unet):
            set_adapter(pipe.unet, str(adapter))
            set_adapter_scale(pipe.unet, str(adapter), adapter_scale)
            context = nullcontext()
        else:
            _check_adapter_folder(pipe, adapter)
            context = bank.use(adapter, adapter_scale)
        with context:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            result = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                          guidance_scale=guidance_scale, width=width, height=height,
                          num_images_per_prompt=num_images, generator=generator,
                          callback_on_step_end=on_step_end)
    return result.images


def _check_adapter_folder(pipe, adapter) -> None:
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter {adapter!r} is neither a loaded adapter "
                                f"({list_adapters(pipe.unet)}) nor an adapter folder")


def _mixed_batch(pipe, bank: AdapterBank, prompt, adapters, adapter_scale, num_images):
    """One adapter (folder or None) per prompt, all in one batch."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(adapters) != len(prompts):
        raise ValueError(f"{len(adapters)} adapters for {len(prompts)} prompts: give one per prompt "
                         "(None for the base model)")
    scales = adapter_scale if isinstance(adapter_scale, (list, tuple)) else [adapter_scale] * len(prompts)
    for folder in adapters:
        _check_adapter_folder(pipe, folder)
    slots = bank.activate_many(list(adapters), list(scales))
    # diffusers repeats each prompt num_images times in place, then stacks [uncond, cond] for CFG
    return mixed_adapters(pipe.unet, [slot for slot in slots for _ in range(num_images)])


def _check_size(width: int, height: int, vae_scale_factor: int) -> None:
    multiple = 8 if vae_scale_factor <= 8 else vae_scale_factor
    for side, value in (("width", width), ("height", height)):
        if value % multiple or not multiple <= value <= MAX_SIDE:
            raise ValueError(f"{side}={value}: must be a multiple of {multiple} between {multiple} "
                             f"and {MAX_SIDE}")
