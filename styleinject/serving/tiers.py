"""The host tier: adapter tensors read from disk, kept in host memory (LRU, bounded in bytes).

Tiers: disk (safetensors) -> host LRU (this; pinned memory on CUDA so copies to the device are
asynchronous) -> device slots (``slots.SlotTable``). Entries are keyed by the caller's key: the
service uses ``<adapter id>@<content hash>``; a bare folder is keyed by its path and file stamp.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from styleinject.adapters.config import StyleInjectConfig
from styleinject.adapters.io import WEIGHTS_NAME, read_adapter


@dataclass(frozen=True)
class AdapterRef:
    """One adapter a request uses: its folder, the user's scale and (optionally) a cache key."""

    source: str
    scale: float = 1.0
    key: str | None = None

    def cache_key(self) -> str:
        if self.key:
            return self.key
        folder = Path(self.source).resolve()
        try:
            stat = (folder / WEIGHTS_NAME).stat()
            stamp = f"{stat.st_mtime_ns}-{stat.st_size}"
        except OSError:
            stamp = "missing"
        return f"{folder}@{stamp}"  # a re-saved folder is a new entry


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0  # = reads from disk
    evictions: int = 0


class HostCache:
    """LRU of ``(config, tensors)`` by key, at most ``max_bytes`` (the newest entry always stays)."""

    def __init__(self, max_bytes: int = 2 << 30, pin: bool | None = None) -> None:
        self.max_bytes = max_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.stats = TierStats()
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[StyleInjectConfig, dict[str, torch.Tensor], int]] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(entry[2] for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, ref: AdapterRef) -> tuple[str, StyleInjectConfig, dict[str, torch.Tensor]]:
        """``(key, config, tensors)`` from memory, or read from disk (``AdapterLoadError`` if bad)."""
        key = ref.cache_key()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return key, entry[0], entry[1]
        cfg, tensors = read_adapter(ref.source)  # outside the lock: other keys stay servable
        if self.pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            self.stats.misses += 1
            self._entries[key] = (cfg, tensors, size)
            self._entries.move_to_end(key)
            while self.nbytes > self.max_bytes and len(self._entries) > 1:
                self._entries.popitem(last=False)
                self.stats.evictions += 1
        return key, cfg, tensors

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)
