"""StyleInject adapters: config, layers, injection, safe save/load.

Names load lazily (like the package's top level), so ``styleinject.adapters.config`` and the
training config can be read without torch, e.g. by the API for its schema defaults.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "StyleInjectConfig": "config",
    "StyleInjectLayer": "layers",
    "AdapterLoadError": "io",
    "load_adapter": "io",
    "read_adapter_metadata": "io",
    "save_adapter": "io",
    **{name: "model" for name in (
        "active_adapter", "adapters_disabled", "adapter_parameters", "adapter_state_dict", "count_parameters",
        "delete_adapter", "disable_adapters", "enable_adapters", "get_adapter_config", "inject", "list_adapters",
        "set_adapter", "set_adapter_scale")},
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"styleinject.adapters.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'styleinject.adapters' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
