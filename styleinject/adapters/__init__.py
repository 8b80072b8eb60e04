"""StyleInject adapters: config, layers, injection, safe save/load."""

from styleinject.adapters.config import StyleInjectConfig
from styleinject.adapters.inject import (
    active_adapter,
    adapters_disabled,
    adapter_parameters,
    adapter_state_dict,
    count_parameters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    get_adapter_config,
    inject,
    list_adapters,
    set_adapter,
    set_adapter_scale,
)
from styleinject.adapters.io import AdapterLoadError, load_adapter, read_adapter_metadata, save_adapter
from styleinject.adapters.layers import StyleInjectLayer

__all__ = [
    "AdapterLoadError",
    "StyleInjectConfig",
    "StyleInjectLayer",
    "active_adapter",
    "adapters_disabled",
    "adapter_parameters",
    "adapter_state_dict",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "get_adapter_config",
    "inject",
    "list_adapters",
    "load_adapter",
    "read_adapter_metadata",
    "save_adapter",
    "set_adapter",
    "set_adapter_scale",
]
