"""LoRA files in and out: import diffusers/PEFT and kohya (A1111, ComfyUI) LoRA files as LoRA-mode
adapters, export LoRA-mode adapters to those formats. Torch-free (the API validates uploads with it).

Names load lazily, so the CLI can import ``styleinject.interop.cli`` for ``--help`` without numpy.
"""

from __future__ import annotations

import importlib

__all__ = ["FORMATS", "LoraFormatError", "export_lora", "import_lora", "module_inventory"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("styleinject.interop.lora"), name)
    raise AttributeError(f"module 'styleinject.interop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
