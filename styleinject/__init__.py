"""StyleInject: dynamic multi-style low-rank adapters with AdaIN rescaling for diffusion UNets.

The public names below load lazily, so torch-free parts (``styleinject.train.data`` for dataset
validation in the API image) can be imported without torch installed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "StyleInjectConfig",
    "adapter_parameters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "inject",
    "list_adapters",
    "load_adapter",
    "save_adapter",
    "set_adapter",
    "set_adapter_scale",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("styleinject.adapters"), name)
    raise AttributeError(f"module 'styleinject' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
