"""Adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``. Never pickle."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from styleinject.adapters.config import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, StyleInjectConfig
from styleinject.adapters.model import (
    adapter_state_dict,
    assign_adapter,
    delete_adapter,
    expected_state_shapes,
    get_adapter_config,
    inject,
    list_adapters,
    set_adapter,
)


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded into this model; the model was left unchanged."""


def save_adapter(model: nn.Module, out_dir: str | Path, adapter_name: str = "default",
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``adapter_name`` of ``model`` to ``out_dir``; files are replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = get_adapter_config(model, adapter_name)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, adapter_name).items()}
    header = {"format": "pt", "adapter_type": "styleinject", "styleinject_format_version": FORMAT_VERSION}
    base_model = _base_model_id(model)
    if base_model:
        header["base_model"] = base_model
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})
    _atomic_write(out_dir / WEIGHTS_NAME, lambda path: save_file(tensors, str(path), metadata=header))
    _atomic_write(out_dir / CONFIG_NAME,
                  lambda path: Path(path).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"))
    return out_dir


def read_adapter_metadata(directory: str | Path) -> dict[str, str]:
    """The string metadata stored in the safetensors header (base model, kind, steps, seed, ...)."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise AdapterLoadError(f"{path}: cannot read the safetensors header ({exc})") from None


def read_adapter(directory: str | Path) -> tuple[StyleInjectConfig, dict[str, torch.Tensor]]:
    """Read and validate an adapter folder without touching any model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(f"{directory} is not a folder; pass the folder save_adapter wrote")
    try:
        cfg = StyleInjectConfig.load(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise AdapterLoadError(str(exc)) from None
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{path} not found: the folder has a config but no weights")
    try:
        tensors = load_file(str(path))
        metadata = read_adapter_metadata(directory)
    except (SafetensorError, OSError) as exc:
        raise AdapterLoadError(f"{path} is corrupt or truncated ({exc}); save or download it again") from None
    version = metadata.get("styleinject_format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise AdapterLoadError(f"{path} has format version {version}; this styleinject reads "
                               f"version {FORMAT_VERSION}: upgrade styleinject")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise AdapterLoadError(f"{path} holds non-finite values (NaN/Inf) in {bad[:3]}: the training "
                               "run that wrote it diverged")
    return cfg, tensors


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load the adapter folder ``directory`` into ``model`` as ``adapter_name`` and activate it.

    If ``adapter_name`` is already loaded with the same shapes its tensors are overwritten in place
    (no module is rebuilt). Any mismatch raises ``AdapterLoadError`` and leaves ``model`` unchanged.
    """
    cfg, tensors = read_adapter(directory)
    return load_adapter_tensors(model, cfg, tensors, adapter_name, source=str(directory))


def load_adapter_tensors(model: nn.Module, cfg: StyleInjectConfig, tensors: dict[str, torch.Tensor],
                         adapter_name: str = "default", source: str = "adapter") -> nn.Module:
    """``load_adapter`` for a config and tensors already in memory (see ``read_adapter``)."""
    try:
        expected = expected_state_shapes(model, cfg)
    except ValueError as exc:
        raise AdapterLoadError(f"{source} does not fit this model: {exc}") from None
    _check_shapes(source, expected, tensors)
    if adapter_name in list_adapters(model):
        current = adapter_state_dict(model, adapter_name)
        if {k: tuple(v.shape) for k, v in current.items()} != expected:
            raise AdapterLoadError(
                f"{source} has other shapes than the loaded adapter {adapter_name!r}: "
                "delete_adapter() it first or load it under another name")
        assign_adapter(model, adapter_name, cfg, tensors)
        set_adapter(model, adapter_name)
        return model
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    inject(model, cfg, adapter_name)
    # loading is not training: give the model's own parameters back their requires_grad flags
    for param in model.parameters():
        if id(param) in grad_flags:
            param.requires_grad_(grad_flags[id(param)])
    try:
        assign_adapter(model, adapter_name, cfg, tensors)
    except Exception:
        delete_adapter(model, adapter_name)
        raise
    return model


def _check_shapes(directory, expected: dict[str, tuple], tensors: dict[str, torch.Tensor]) -> None:
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    lines = [f"{directory} does not match this model:"]
    if missing:
        lines.append(f"  {len(missing)} tensors missing from the file, e.g. {missing[:3]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} tensors for layers this model lacks, e.g. {unexpected[:3]}")
    for key in wrong[:3]:
        lines.append(f"  {key}: file has shape {got[key]}, this model needs {expected[key]}")
    if len(wrong) > 3:
        lines.append(f"  ... and {len(wrong) - 3} more shape mismatches")
    lines.append("  Load it into the base model it was trained on (see 'base_model' in its metadata).")
    raise AdapterLoadError("\n".join(lines))


def _base_model_id(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    if not name:
        return None
    path = Path(str(name))
    # a UNet loaded from a local pipeline folder records ".../unet": name the pipeline instead
    return str(path.parent) if path.name == "unet" and path.parent.exists() else str(name)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
