"""StyleInject: dynamic multi-style low-rank adapters with AdaIN rescaling for diffusion UNets."""

from styleinject.adapters import (
    AdapterLoadError,
    StyleInjectConfig,
    adapter_parameters,
    count_parameters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    inject,
    list_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
    set_adapter_scale,
)

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
