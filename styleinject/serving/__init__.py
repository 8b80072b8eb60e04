"""The serving engine: stacked adapter slots, continuous batching across requests and adapters.

Torch only: no web, database or queue imports (the worker's generate task wraps it).
"""

from styleinject.serving.engine import Engine, engine_for
from styleinject.serving.request import Request
from styleinject.serving.slots import SlotsBusy, SlotTable
from styleinject.serving.tiers import AdapterRef, HostCache

__all__ = ["AdapterRef", "Engine", "HostCache", "Request", "SlotTable", "SlotsBusy", "engine_for"]
