"""Walk a model, wrap the targeted layers, and manage the named adapters living in them."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from styleinject.adapters.config import StyleInjectConfig
from styleinject.adapters.layers import (
    PARAM_PREFIX,
    StyleInjectLayer,
    adapter_shapes,
    check_supported,
)

_CONFIGS_ATTR = "_styleinject_configs"
_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")


def plan(model: nn.Module, cfg: StyleInjectConfig) -> list[tuple[str, nn.Module, dict]]:
    """(qualified name, base layer, layer options) for every layer ``cfg`` targets in ``model``.

    Names are those of the unwrapped model, so a plan is the same before and after injection.
    """
    targets = []
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, StyleInjectLayer):
            wrapped.append(name)
            module = module.base_layer
        if isinstance(module, nn.Conv2d) and cfg.targets_conv(name):
            check_supported(module, name)
            targets.append((name, module, cfg.layer_options(name, conv=True)))
        elif isinstance(module, nn.Linear) and cfg.targets_linear(name):
            targets.append((name, module, cfg.layer_options(name, conv=False)))
    if not targets:
        examples = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:5]
        raise ValueError(
            f"no layer matched target_modules={cfg.target_modules} / conv_target_modules="
            f"{cfg.conv_target_modules}; layer names in this model look like {examples}")
    return targets


def expected_state_shapes(model: nn.Module, cfg: StyleInjectConfig) -> dict[str, tuple[int, ...]]:
    """The keys and shapes ``save_adapter`` writes for an adapter of ``cfg`` on ``model``."""
    shapes = {}
    for name, base, options in plan(model, cfg):
        for kind, shape in adapter_shapes(base, options).items():
            shapes[f"{name}.{kind}"] = tuple(shape)
    return shapes


def inject(model: nn.Module, cfg: StyleInjectConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place and make it the active, trainable one.

    Every parameter that is not this adapter's is frozen. Returns ``model``.
    """
    if not _NAME_RE.fullmatch(adapter_name):
        raise ValueError(f"adapter name {adapter_name!r} may only hold letters, digits, '_' and '-'")
    if adapter_name in list_adapters(model):
        raise ValueError(f"model already has an adapter named {adapter_name!r}: pick another name, "
                         "or load_adapter() to replace its weights, or delete_adapter() first")
    targets = plan(model, cfg)
    for name, base, options in targets:
        layer = model.get_submodule(name)
        if not isinstance(layer, StyleInjectLayer):
            layer = StyleInjectLayer(base)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
        layer.add_adapter(adapter_name, options)
    _configs(model)[adapter_name] = cfg
    for param in model.parameters():
        param.requires_grad_(False)
    for param in adapter_parameters(model, adapter_name):
        param.requires_grad_(True)
    set_adapter(model, adapter_name)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter; layers left with no adapter are unwrapped back to their base layer."""
    _require(model, adapter_name)
    for name, layer in list(_named_layers(model)):
        layer.remove_adapter(adapter_name)
        if not layer.si_options and layer.si_slots is None:  # a serving slot table still uses it
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base_layer)
    del _configs(model)[adapter_name]


def list_adapters(model: nn.Module) -> list[str]:
    return list(_configs(model))


def get_adapter_config(model: nn.Module, adapter_name: str = "default") -> StyleInjectConfig:
    _require(model, adapter_name)
    return _configs(model)[adapter_name]


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of every layer (and re-enable adapters)."""
    _require(model, adapter_name)
    for _, layer in _named_layers(model):
        layer.active_adapter = adapter_name if adapter_name in layer.si_options else None
        layer.adapters_enabled = True


def active_adapter(model: nn.Module) -> str | None:
    for _, layer in _named_layers(model):
        if layer.adapters_enabled and layer.active_adapter is not None:
            return layer.active_adapter
    return None


def disable_adapters(model: nn.Module) -> None:
    """Run the base model only; adapters stay resident and ``enable_adapters`` brings them back."""
    for _, layer in _named_layers(model):
        layer.adapters_enabled = False


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model inside the block; each layer's enabled state comes back afterwards."""
    layers = [layer for _, layer in _named_layers(model)]
    states = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.adapters_enabled = state


def enable_adapters(model: nn.Module) -> None:
    for _, layer in _named_layers(model):
        layer.adapters_enabled = True


def set_adapter_scale(model: nn.Module, adapter_name: str, scale: float) -> None:
    """Multiply an adapter's whole effect (low-rank update and STA term) by ``scale``; 0 = base model."""
    _require(model, adapter_name)
    for _, layer in _named_layers(model):
        if adapter_name in layer.si_options:
            layer.si_options[adapter_name]["user_scale"] = float(scale)


def adapter_parameters(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The parameters to optimise for ``adapter_name`` (a filter on the ``si_`` prefix)."""
    _require(model, adapter_name)
    return [p for n, p in model.named_parameters() if _owner(n) == adapter_name]


def count_parameters(model: nn.Module, adapter_name: str | None = None) -> int:
    """Number of adapter parameters, for one adapter or (``None``) for all of them."""
    return sum(p.numel() for n, p in model.named_parameters()
               if _owner(n) is not None and (adapter_name is None or _owner(n) == adapter_name))


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``{"<layer>.si_A": tensor, ...}``: the adapter's tensors keyed without the adapter name."""
    _require(model, adapter_name)
    return {n.rsplit(".", 1)[0]: p
            for n, p in model.named_parameters() if _owner(n) == adapter_name}


def assign_adapter(model: nn.Module, adapter_name: str, cfg: StyleInjectConfig,
                   tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite a loaded adapter's tensors in place (keys as ``adapter_state_dict``) and options."""
    current = adapter_state_dict(model, adapter_name)
    with torch.no_grad():
        for key, param in current.items():
            param.copy_(tensors[key].to(param.dtype))
    # adapters of the same shapes may still differ in alpha or dropout
    options = {name: opts for name, _, opts in plan(model, cfg)}
    for name, layer in _named_layers(model):
        if adapter_name in layer.si_options:
            user_scale = layer.si_options[adapter_name]["user_scale"]
            layer.si_options[adapter_name] = {**options[name], "user_scale": user_scale}
    _configs(model)[adapter_name] = cfg


def _owner(param_name: str) -> str | None:
    """Adapter name of a parameter called ``...<layer>.si_<kind>.<adapter>``, else None."""
    parts = param_name.rsplit(".", 2)
    if len(parts) == 3 and parts[1].startswith(PARAM_PREFIX):
        return parts[2]
    return None


def _named_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, StyleInjectLayer)]


def _configs(model: nn.Module) -> dict[str, StyleInjectConfig]:
    configs = model.__dict__.get(_CONFIGS_ATTR)
    if configs is None:
        configs = {}
        model.__dict__[_CONFIGS_ATTR] = configs
    return configs


def _require(model: nn.Module, adapter_name: str) -> None:
    if adapter_name not in _configs(model):
        raise KeyError(f"no adapter named {adapter_name!r}; loaded adapters: {list_adapters(model)}")
