"""Resident adapters for serving: a host-memory LRU of adapter tensors and in-place swaps into slots.

The base model stays resident. Each distinct adapter *shape* gets one slot (an adapter injected
once); switching to another adapter of that shape copies its tensors into the slot's parameters,
so no module is rebuilt and no device memory is allocated per request. ``use()`` holds a lock for
the whole forward pass, so concurrent requests for different adapters never see each other's weights.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from styleinject.adapters.config import StyleInjectConfig
from styleinject.adapters.inject import (
    adapters_disabled,
    expected_state_shapes,
    set_adapter,
    set_adapter_scale,
)
from styleinject.adapters.io import WEIGHTS_NAME, load_adapter_tensors, read_adapter


class AdapterBank:
    def __init__(self, model: nn.Module, max_bytes: int = 2 << 30):
        self.model = model
        self.max_bytes = max_bytes
        self.lock = threading.RLock()
        self._cache: OrderedDict[str, tuple[StyleInjectConfig, dict[str, torch.Tensor], int]] = OrderedDict()
        self._slots: dict[str, list[str]] = {}  # shape signature -> adapter names in the model
        self.loads = 0  # reads from disk, for tests and metrics

    @property
    def cached_bytes(self) -> int:
        return sum(entry[2] for entry in self._cache.values())

    def fetch(self, directory: str | Path) -> tuple[StyleInjectConfig, dict[str, torch.Tensor]]:
        """The adapter's config and host tensors, from the LRU or (then cached) from disk."""
        directory = Path(directory).resolve()
        weights = directory / WEIGHTS_NAME
        stamp = weights.stat().st_mtime_ns if weights.exists() else 0
        key = f"{directory}@{stamp}"  # a re-saved adapter is a new entry
        with self.lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                cfg, tensors, _ = self._cache[key]
                return cfg, tensors
            cfg, tensors = read_adapter(directory)
            self.loads += 1
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            self._cache[key] = (cfg, tensors, size)
            while self.cached_bytes > self.max_bytes and len(self._cache) > 1:
                self._cache.popitem(last=False)
            return cfg, tensors

    def activate(self, directory: str | Path, scale: float = 1.0) -> str:
        """Swap the adapter in ``directory`` into its slot and make it active; returns the slot name."""
        with self.lock:
            slot = self.activate_many([directory], [scale])[0]
            set_adapter(self.model, slot)
            return slot

    def activate_many(self, directories: list[str | Path | None], scales: list[float]) -> list[str | None]:
        """Put each distinct adapter in its own slot (for a mixed batch); returns slot names."""
        with self.lock:
            used: dict[tuple[str, float], str] = {}
            names: list[str | None] = []
            for directory, scale in zip(directories, scales, strict=True):
                if directory is None:
                    names.append(None)
                    continue
                key = (str(Path(directory).resolve()), float(scale))
                if key not in used:
                    cfg, tensors = self.fetch(directory)
                    shapes = sorted(expected_state_shapes(self.model, cfg).items())
                    signature = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
                    slots = self._slots.setdefault(signature, [])
                    free = [s for s in slots if s not in used.values()]
                    if not free:
                        slots.append(f"slot_{sum(len(v) for v in self._slots.values())}")
                        free = slots[-1:]
                    load_adapter_tensors(self.model, cfg, tensors, free[0], source=str(directory))
                    set_adapter_scale(self.model, free[0], scale)
                    used[key] = free[0]
                names.append(used[key])
            return names

    @contextmanager
    def use(self, directory: str | Path | None, scale: float = 1.0):
        """Hold the model with ``directory``'s adapter active (or none) for one forward pass."""
        with self.lock:
            if directory is None:
                with adapters_disabled(self.model):
                    yield None
            else:
                yield self.activate(directory, scale)
