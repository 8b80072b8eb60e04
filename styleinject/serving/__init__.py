"""The serving engine: stacked adapter slots, continuous batching across requests and adapters.

Torch only: no web, database or queue imports (the worker's generate task wraps it). Names load
lazily, so ``styleinject.serving.defaults`` stays readable without torch (the API reads it).
"""

from __future__ import annotations

import importlib

_HOMES = {"Engine": "engine", "engine_for": "engine", "Request": "request", "SlotTable": "slots",
          "SlotsBusy": "slots", "AdapterRef": "tiers", "HostCache": "tiers"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"styleinject.serving.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'styleinject.serving' has no attribute {name!r}")
