"""Stacked adapter slots: every resident adapter in one set of tensors, chosen per sample by index.

Each wrapped layer gets a ``LayerSlots`` child holding, for S slots,

    A       (S, n, r, in)            Conv2d: (S, n, r, in, kh, kw)
    B       (S, out, r)
    router  weight (S, n, in), bias (S, n)      only where some adapter has n > 1
    G       (S, out, n)                         only where some adapter uses STA
    scale   (S,)                                alpha / r of the adapter in that slot

zero-padded to the largest rank r and style count n seen on that layer. Padding is exact: a zero
row of A and column of B add nothing, and a padded style gets a router logit of -inf (weight 0,
bias -inf), so its softmax weight is 0. Slot 0 is the zero adapter (the base model).

A batch carries ``ids`` (batch, K) and ``weights`` (batch, K): K adapters per sample (K = 1
usually; several when a request combines adapters), each with its user scale. The layer's delta is

    Delta_h[b] = sum_k w[b,k] * ( scale[id] * B[id] sum_i s_i A[id, i](x[b])  +  (G[id] s) * (h[b] - mu(h[b])) )

with s = softmax(router[id](pool(x[b]))) and id = ids[b, k]: Eq. (2) and Eq. (4) of the paper with
the adapter's tensors gathered per sample. A batch that mixes 16 adapters runs the same kernels
as a batch with one, and a swap is a copy into a slot: no module is rebuilt, no shape changes, so
``torch.compile`` does not recompile. A slot table only grows (new layers, larger r or n, STA on a
layer that had none) when an adapter bigger than any seen arrives; pre-size it to avoid that.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from styleinject.adapters.config import StyleInjectConfig
from styleinject.adapters.model import expected_state_shapes, list_adapters, plan
from styleinject.adapters.layers import StyleInjectLayer


class SlotBatch:
    """Per-sample slot ids and weights of the forward pass in flight, shared by every layer.

    A plain object rather than module state, so setting it changes no module attribute."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None  # (batch, K) int64
        self.weights: torch.Tensor | None = None  # (batch, K)


class LayerSlots(nn.Module):
    """The slot tensors of one layer (non-persistent buffers: never saved with the base model)."""

    def __init__(self, base: nn.Module, batch: SlotBatch, num_slots: int) -> None:
        super().__init__()
        self.batch = batch
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            self.conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
            self.fan_in, self.out = base.in_channels, base.out_channels
            self.kernel = tuple(base.kernel_size)
        else:
            self.fan_in, self.out = base.in_features, base.out_features
            self.kernel = ()
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("A", torch.zeros(num_slots, 1, 1, self.fan_in, *self.kernel, **like), persistent=False)
        self.register_buffer("B", torch.zeros(num_slots, self.out, 1, **like), persistent=False)
        self.register_buffer("scale", torch.zeros(num_slots, **like), persistent=False)
        for name in ("router_weight", "router_bias", "G"):  # only where some adapter needs them
            self.register_buffer(name, None, persistent=False)

    @property
    def rank(self) -> int:
        return self.A.shape[2]

    @property
    def styles(self) -> int:
        return self.A.shape[1]

    # -- growing (rare: changes shapes) -----------------------------------------------------

    def grow(self, rank: int, styles: int, sta: bool) -> bool:
        """Make room for an adapter of this rank / style count / STA; True if anything changed."""
        rank, styles = max(rank, self.rank), max(styles, self.styles)
        changed = False
        if (rank, styles) != (self.rank, self.styles):
            old_A, old_B = self.A, self.B
            A = old_A.new_zeros(old_A.shape[0], styles, rank, self.fan_in, *self.kernel)
            A[:, : old_A.shape[1], : old_A.shape[2]] = old_A
            B = old_B.new_zeros(old_B.shape[0], self.out, rank)
            B[:, :, : old_B.shape[2]] = old_B
            self.A, self.B = A, B
            changed = True
        if styles > 1 and (self.router_weight is None or self.router_weight.shape[1] != styles):
            weight = self.A.new_zeros(self.A.shape[0], styles, self.fan_in)
            bias = self.A.new_full((self.A.shape[0], styles), float("-inf"))
            bias[:, 0] = 0  # slots so far: one style (or zero adapter)
            if self.router_weight is not None:
                weight[:, : self.router_weight.shape[1]] = self.router_weight
                bias[:, : self.router_bias.shape[1]] = self.router_bias
            self._set_buffer("router_weight", weight)
            self._set_buffer("router_bias", bias)
            changed = True
        if (sta or self.G is not None) and (self.G is None or self.G.shape[2] != styles):
            G = self.A.new_zeros(self.A.shape[0], self.out, styles)
            if self.G is not None:
                G[:, :, : self.G.shape[2]] = self.G
            self._set_buffer("G", G)
            changed = True
        return changed

    def _set_buffer(self, name: str, value: torch.Tensor) -> None:
        self._buffers[name] = value

    # -- writing a slot (in place) ----------------------------------------------------------

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.scale[slot] = 0
        if self.router_weight is not None:
            self.router_weight[slot].zero_()
            self.router_bias[slot].fill_(float("-inf"))
            self.router_bias[slot, 0] = 0
        if self.G is not None:
            self.G[slot].zero_()

    @torch.no_grad()
    def write(self, slot: int, tensors: dict[str, torch.Tensor], options: dict) -> None:
        """Copy one adapter's tensors for this layer into ``slot`` (zero-padded)."""
        self.clear(slot)
        A = tensors["si_A"]
        n, r = A.shape[0], A.shape[1]
        self.A[slot, :n, :r].copy_(A)
        self.B[slot, :, :r].copy_(tensors["si_B"])
        self.scale[slot] = options["scale"]
        if "si_router_weight" in tensors and n > 1:  # a router kept at n = 1 (keep_router) is s = 1
            self.router_weight[slot, :n].copy_(tensors["si_router_weight"])
            self.router_bias[slot, :n].copy_(tensors["si_router_bias"])
        if "si_G" in tensors:
            G = tensors["si_G"]
            if "si_G_bias" in tensors:  # s sums to 1: G s + b = (G + b 1^T) s, folded in exactly
                G = G + tensors["si_G_bias"][:, None]
            self.G[slot, :, :n].copy_(G)

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Delta_h for every sample, from the slots named in ``self.batch``."""
        ids, w = self.batch.ids, self.batch.weights.to(x.dtype)
        if self.is_conv:
            pooled = x.mean(dim=(2, 3))
        else:
            tokens = x.reshape(x.shape[0], -1, x.shape[-1])
            pooled = tokens.mean(dim=1)
        # 1. style weights s (batch, K, n): softmax of each sample's router logits
        if self.router_weight is None:
            s = None
        else:
            logits = torch.einsum("bi,bkni->bkn", pooled, self.router_weight[ids]) + self.router_bias[ids]
            s = logits.softmax(dim=-1)
        # 2. mix the n down-projections per sample: A_mix = sum_i s_i A[id, i] (Eq. 2), as one GEMM
        #    of a (batch*K, S*n) coefficient matrix (s at the sample's slot, 0 elsewhere) with the
        #    whole table: its cost does not depend on how many different adapters the batch mixes,
        #    and no per-sample copy of A is made
        S, n = self.A.shape[:2]
        coeff = x.new_zeros(ids.shape[0], ids.shape[1], S, n)
        mix = x.new_ones(*ids.shape, n) if s is None else s  # n = 1 layers: the one style, weight 1
        coeff.scatter_(2, ids[..., None, None].expand(-1, -1, 1, n), mix[:, :, None, :])
        A_mix = (coeff.view(-1, S * n) @ self.A.view(S * n, -1)).view(*ids.shape, *self.A.shape[2:])
        Bw = self.B[ids] * (self.scale[ids] * w)[..., None, None]  # (batch, K, out, r), scaled
        # 3. low-rank update B A_mix x, summed over the sample's K adapters
        if self.is_conv:
            batch, channels = x.shape[:2]
            z = F.conv2d(x.reshape(1, batch * channels, *x.shape[2:]),
                         A_mix.reshape(-1, channels, *self.kernel), groups=batch, **self.conv)
            z = z.view(batch, A_mix.shape[1], A_mix.shape[2], *z.shape[2:])
            delta = torch.einsum("bkrhw,bkor->bohw", z, Bw)
        else:
            z = torch.einsum("bli,bkri->bklr", tokens, A_mix)
            delta = torch.einsum("bklr,bkor->blo", z, Bw).reshape(h.shape)
        # 4. STA: (G s) * (h - mu(h)) (Eq. 4 with f_s(sigma) = sigma * (1 + G s))
        if self.G is not None:
            G = self.G[ids] * w[..., None, None]  # (batch, K, out, n)
            gain = G[..., 0].sum(dim=1) if s is None else torch.einsum("bkon,bkn->bo", G, s)
            if self.is_conv:
                delta = delta + gain[:, :, None, None] * (h - h.mean(dim=(2, 3), keepdim=True))
            else:
                ht = h.reshape(h.shape[0], -1, h.shape[-1])
                delta = delta + (gain[:, None, :] * (ht - ht.mean(dim=1, keepdim=True))).reshape(h.shape)
        return delta


@dataclass
class _Resident:
    slot: int
    refs: int = 0


@dataclass
class SlotStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    grows: int = 0


class SlotsBusy(RuntimeError):
    """Every slot holds an adapter that a running sample still uses; retry after a step."""


class SlotTable:
    """The device tier: which adapter lives in which slot, LRU over unpinned slots.

    ``acquire(key, cfg, tensors)`` returns the slot of the adapter (copying it in if it is not
    resident) and pins it until ``release(key)``; slot 0 is the base model and never evicted.
    """

    def __init__(self, model: nn.Module, num_slots: int = 16) -> None:
        if num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (slot 0 is the base model), got {num_slots}")
        self.model = model
        self.num_slots = num_slots
        self.batch = SlotBatch()
        self.stats = SlotStats()
        self.lock = threading.RLock()
        self._resident: OrderedDict[str, _Resident] = OrderedDict()
        self._free = list(range(1, num_slots))
        self._layers: dict[str, LayerSlots] = {}
        self._named: tuple[str, ...] | None = None
        self.sync()

    def sync(self) -> None:
        """Give slots to layers wrapped for named adapters since the last call (all slots empty
        there), so a slot batch never runs a named adapter's weights by accident."""
        named = tuple(list_adapters(self.model))
        if named == self._named:
            return
        with self.lock:
            for name, module in self.model.named_modules():
                if isinstance(module, StyleInjectLayer):
                    self._attach(name, module)
            self._named = named

    # -- layers ------------------------------------------------------------------------------

    def _attach(self, name: str, layer: StyleInjectLayer) -> LayerSlots:
        slots = self._layers.get(name)
        if slots is None:
            if layer.si_slots is not None:
                raise RuntimeError("this model already serves from another slot table: one engine per "
                                   "pipeline (styleinject.serving.engine_for(pipe) returns the pipeline's engine)")
            slots = LayerSlots(layer.base_layer, self.batch, self.num_slots)
            layer.si_slots = slots
            self._layers[name] = slots
        return slots

    def prepare(self, cfg: StyleInjectConfig) -> bool:
        """Wrap and size every layer ``cfg`` targets; True when shapes changed (a recompile)."""
        changed = False
        with self.lock:
            for name, base, options in plan(self.model, cfg):
                layer = self.model.get_submodule(name)
                if not isinstance(layer, StyleInjectLayer):
                    layer = StyleInjectLayer(base)
                    parent, _, child = name.rpartition(".")
                    setattr(self.model.get_submodule(parent), child, layer)
                    changed = True
                if name not in self._layers:
                    changed = True
                changed |= self._attach(name, layer).grow(options["rank"], options["num_styles"], options["sta"])
        if changed:
            self.stats.grows += 1
        return changed

    # -- residency ---------------------------------------------------------------------------

    def resident(self) -> list[str]:
        return list(self._resident)

    def acquire(self, key: str, cfg: StyleInjectConfig, tensors: dict[str, torch.Tensor]) -> int:
        """Pin adapter ``key`` in a slot and return the slot (copying it in on a miss)."""
        with self.lock:
            entry = self._resident.get(key)
            if entry is not None:
                self.stats.hits += 1
                self._resident.move_to_end(key)
                entry.refs += 1
                return entry.slot
            slot = self._take_slot()
            try:
                self._write(slot, cfg, tensors)
            except BaseException:
                self._free.append(slot)
                raise
            self._resident[key] = _Resident(slot, refs=1)
            self.stats.misses += 1
            return slot

    def release(self, key: str) -> None:
        with self.lock:
            entry = self._resident.get(key)
            if entry is not None and entry.refs > 0:
                entry.refs -= 1

    def evict(self, key: str) -> bool:
        """Drop an unpinned adapter (e.g. it was deleted or re-saved); False if pinned or absent."""
        with self.lock:
            entry = self._resident.get(key)
            if entry is None or entry.refs:
                return False
            del self._resident[key]
            self._clear(entry.slot)
            self._free.append(entry.slot)
            return True

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop(0)
        for key, entry in self._resident.items():  # least recently used first
            if entry.refs == 0:
                del self._resident[key]
                self.stats.evictions += 1
                return entry.slot
        raise SlotsBusy(f"all {self.num_slots - 1} adapter slots are in use by running samples")

    def _clear(self, slot: int) -> None:
        for slots in self._layers.values():
            slots.clear(slot)

    def _write(self, slot: int, cfg: StyleInjectConfig, tensors: dict[str, torch.Tensor]) -> None:
        expected = expected_state_shapes(self.model, cfg)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            raise ValueError(f"adapter tensors do not match its config on this model "
                             f"({len(set(got) ^ set(expected))} keys differ)")
        self.prepare(cfg)
        options = {name: opts for name, _, opts in plan(self.model, cfg)}
        per_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            layer, kind = key.rsplit(".", 1)
            per_layer.setdefault(layer, {})[kind] = tensor
        for name, slots in self._layers.items():
            if name in per_layer:
                slots.write(slot, per_layer[name], options[name])
            else:
                slots.clear(slot)

    # -- a forward pass ----------------------------------------------------------------------

    def set_batch(self, ids: torch.Tensor | None, weights: torch.Tensor | None = None) -> None:
        """Slot ids (batch, K) and weights for the next forwards; None goes back to named adapters."""
        if ids is None:
            self.batch.ids = self.batch.weights = None
            return
        self.sync()
        if ids.dim() == 1:
            ids = ids[:, None]
        if weights is None:
            weights = torch.ones(ids.shape, dtype=torch.float32)
        device = next(iter(self._layers.values())).A.device if self._layers else ids.device
        self.batch.ids = ids.to(device=device, dtype=torch.long)
        self.batch.weights = weights.reshape(ids.shape).to(device=device)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for s in self._layers.values() for b in s.buffers())
