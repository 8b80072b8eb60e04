"""Sampling settings a model recommends, and the limits every front end checks.

A local pipeline folder may hold ``generation_defaults.json`` (keys ``steps``, ``guidance_scale``,
``width``, ``height``); otherwise 30 steps, guidance 7.5 and the UNet's native size.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_SIDE = 2048
DEFAULTS_FILE = "generation_defaults.json"
_DEFAULT_KEYS = {"steps": int, "guidance_scale": float, "width": int, "height": int}


def read_generation_defaults(folder: str | Path) -> dict:
    """The sampling settings a model folder recommends (``generation_defaults.json``), checked. For a
    single-file checkpoint, its ``<name>.config/`` folder's (where ``load_pipeline`` finds its configs)."""
    folder = Path(folder)
    if folder.suffix == ".safetensors":
        folder = folder.with_suffix(".config")
    path = folder / DEFAULTS_FILE
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


def check_size(width: int, height: int, vae_scale_factor: int) -> None:
    multiple = 8 if vae_scale_factor <= 8 else vae_scale_factor
    for side, value in (("width", width), ("height", height)):
        if value % multiple or not multiple <= value <= MAX_SIDE:
            raise ValueError(f"{side}={value}: must be a multiple of {multiple} between {multiple} "
                             f"and {MAX_SIDE}")
