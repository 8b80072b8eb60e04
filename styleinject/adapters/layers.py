"""StyleInject layer wrappers for ``nn.Linear`` and ``nn.Conv2d``.

Equations (paper numbering):
  (2) DMA   Delta_h = scale * B * sum_i s_i A_i(x),    s = softmax(router(pool(x))),  scale = alpha / r
  (4) STA   h* = ((h - mu) / sigma) * f_s(sigma) + mu + Delta_h,   h = W0 x  (the frozen layer)

Our f_s: f_s(sigma) = sigma * (1 + G s) with G: Linear(n -> out, no bias) initialised to zero, so
f_s(sigma) = sigma at init and (4) reduces to
  h* = h + (G s) * (h - mu(h)) + Delta_h
with no division and no std (sigma cancels). B is zero at init too, so an injected model equals its
base model exactly until the first optimiser step. A bias on G is redundant (s sums to 1, so
G s + b = (G + b 1^T) s) and off by default; ``sta_bias`` adds one (zero at init) because the
paper's parameter counts include it (StyleInjectConfig.paper_counts).

mu(h) is the per-sample, per-channel mean over tokens (Linear on (B, L, C)) or over H x W (Conv2d).
For a Linear applied to (B, C) there is a single token, h - mu(h) = 0 and STA is a no-op.
The router pools its input by the mean over tokens / over H x W (the paper writes a spatial sum for
Conv2d; the mean is the same up to a constant factor at one resolution, and keeps the router's logits
independent of the image size at generation time).

Parameters live in ``nn.ParameterDict``s keyed by adapter name under names that start with ``si_``,
so "trainable" and "what to save" are filters on the name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PARAM_PREFIX = "si_"
PARAM_KINDS = ("si_A", "si_B", "si_router_weight", "si_router_bias", "si_G", "si_G_bias")


def adapter_shapes(base_layer: nn.Module, options: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters an adapter with ``options`` adds to ``base_layer``."""
    r, n = options["rank"], options["num_styles"]
    if isinstance(base_layer, nn.Conv2d):
        fan_in, out = base_layer.in_channels, base_layer.out_channels
        shapes = {"si_A": (n, r, fan_in, *base_layer.kernel_size), "si_B": (out, r)}
    else:
        fan_in, out = base_layer.in_features, base_layer.out_features
        shapes = {"si_A": (n, r, fan_in), "si_B": (out, r)}
    if n > 1 or options.get("router"):  # router: kept at n = 1 too (softmax of one logit = 1)
        shapes["si_router_weight"] = (n, fan_in)
        shapes["si_router_bias"] = (n,)
    if options["sta"]:
        shapes["si_G"] = (out, n)
        if options.get("sta_bias"):
            shapes["si_G_bias"] = (out,)
    return shapes


def check_supported(base_layer: nn.Module, name: str) -> None:
    if isinstance(base_layer, nn.Conv2d):
        if base_layer.groups != 1:
            raise ValueError(f"{name}: grouped Conv2d (groups={base_layer.groups}) is not supported; "
                             "remove it from conv_target_modules")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"{name}: Conv2d padding_mode={base_layer.padding_mode!r} is not supported; "
                             "remove it from conv_target_modules")
    elif not isinstance(base_layer, nn.Linear):
        raise ValueError(f"{name}: StyleInject wraps nn.Linear and nn.Conv2d, not "
                         f"{type(base_layer).__name__}")


class StyleInjectLayer(nn.Module):
    """Holds the frozen ``base_layer`` and any number of named adapters; one is active at a time."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.si_A = nn.ParameterDict()
        self.si_B = nn.ParameterDict()
        self.si_router_weight = nn.ParameterDict()
        self.si_router_bias = nn.ParameterDict()
        self.si_G = nn.ParameterDict()
        self.si_G_bias = nn.ParameterDict()
        self.si_options: dict[str, dict] = {}
        self.active_adapter: str | None = None
        self.adapters_enabled = True
        # stacked adapter slots for serving (styleinject.serving.slots), attached by a SlotTable
        self.si_slots: nn.Module | None = None

    # diffusers code sometimes reads these off the projection it calls
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    # -- adapter management ----------------------------------------------------------------

    def add_adapter(self, name: str, options: dict) -> None:
        weight = self.base_layer.weight
        like = {"device": weight.device, "dtype": weight.dtype}
        shapes = adapter_shapes(self.base_layer, options)
        A = torch.empty(shapes["si_A"], **like)
        for style in A:  # each style initialised like a LoRA A (PEFT: kaiming_uniform_, a=sqrt(5))
            nn.init.kaiming_uniform_(style.view(style.shape[0], -1), a=math.sqrt(5))
        if options.get("a_init") == "mixture":
            # n independent A_i mixed with weights 1/n have 1/sqrt(n) the std of one A_i: sqrt(n)
            # gives a uniform router's initial mixture a LoRA A's scale
            A.mul_(math.sqrt(A.shape[0]))
        self.si_A[name] = nn.Parameter(A)
        self.si_B[name] = nn.Parameter(torch.zeros(shapes["si_B"], **like))
        if "si_router_weight" in shapes:
            router = nn.Linear(shapes["si_router_weight"][1], shapes["si_router_weight"][0], **like)
            self.si_router_weight[name] = nn.Parameter(router.weight.detach())
            self.si_router_bias[name] = nn.Parameter(router.bias.detach())
        if "si_G" in shapes:
            self.si_G[name] = nn.Parameter(torch.zeros(shapes["si_G"], **like))
        if "si_G_bias" in shapes:
            self.si_G_bias[name] = nn.Parameter(torch.zeros(shapes["si_G_bias"], **like))
        self.si_options[name] = {**options, "user_scale": 1.0}

    def remove_adapter(self, name: str) -> None:
        for kind in PARAM_KINDS:
            params = getattr(self, kind)
            if name in params:
                del params[name]
        self.si_options.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if self.si_slots is not None and self.si_slots.batch.ids is not None:
            return h + self.si_slots(x, h)  # per-sample adapters from the slot table
        if self.active_adapter is None or not self.adapters_enabled:
            return h
        return h + self._delta(self.active_adapter, x, h)

    def _delta(self, name: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the frozen output ``h``."""
        opts = self.si_options[name]
        s = self._route(name, x)
        xd = F.dropout(x, opts["dropout"], self.training) if opts["dropout"] else x
        delta = self._low_rank(name, xd, s) * opts["scale"]
        if opts["sta"]:
            delta = delta + self._sta(name, h, s)
        if opts["user_scale"] != 1.0:
            delta = delta * opts["user_scale"]
        return delta

    def _route(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """Style weights s (B, n); None when n = 1 (s = [1] for every sample)."""
        if name not in self.si_router_weight:
            return None
        if self.is_conv:
            pooled = x.mean(dim=(2, 3))
        else:
            pooled = x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)
        logits = F.linear(pooled, self.si_router_weight[name].to(x.dtype),
                          self.si_router_bias[name].to(x.dtype))
        return logits.softmax(dim=-1)

    def _low_rank(self, name: str, x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """B * sum_i s_i A_i(x) without the scale: Eq. (2). Mixes the n A's once per sample."""
        A = self.si_A[name].to(x.dtype)
        B = self.si_B[name].to(x.dtype)
        base = self.base_layer
        if self.is_conv:
            conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
            if s is None:
                z = F.conv2d(x, A[0], **conv)
            else:
                # one grouped convolution applies each sample's own mixture sum_i s_i A_i
                batch, channels = x.shape[:2]
                A_mix = torch.einsum("bn,nrckl->brckl", s, A)
                z = F.conv2d(x.reshape(1, batch * channels, *x.shape[2:]),
                             A_mix.reshape(-1, *A.shape[2:]), groups=batch, **conv)
                z = z.view(batch, -1, *z.shape[2:])
            return F.conv2d(z, B[:, :, None, None])
        if s is None:
            return F.linear(F.linear(x, A[0]), B)
        A_mix = torch.einsum("bn,nrc->brc", s, A)
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        z = torch.bmm(tokens, A_mix.transpose(1, 2))
        return F.linear(z, B).reshape(*x.shape[:-1], B.shape[0])

    def _sta(self, name: str, h: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """(G s) * (h - mu(h)): Eq. (4) with f_s(sigma) = sigma * (1 + G s)."""
        G = self.si_G[name].to(h.dtype)
        gain = G[:, 0].expand(h.shape[0], -1) if s is None else F.linear(s, G)  # (B, out)
        if name in self.si_G_bias:
            gain = gain + self.si_G_bias[name].to(h.dtype)
        if self.is_conv:
            centred = h - h.mean(dim=(2, 3), keepdim=True)
            return gain[:, :, None, None] * centred
        tokens = h.reshape(h.shape[0], -1, h.shape[-1])
        centred = tokens - tokens.mean(dim=1, keepdim=True)
        return (gain[:, None, :] * centred).reshape(h.shape)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{k}(r={v['rank']}, n={v['num_styles']}, sta={v['sta']})"
                             for k, v in self.si_options.items())
        return f"active={self.active_adapter!r}, adapters=[{adapters}]"
