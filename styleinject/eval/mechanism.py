"""Mechanism shares: how much of a trained adapter's effect each of its parts carries.

The adapter's effect on a fixed set of UNet inputs is ``E = eps_full - eps_base`` (predicted noise
with the adapter, minus without). Removing a part P gives ``eps_-P``; P's share is

    share(P) = || eps_full - eps_-P || / || eps_full - eps_base ||

(norms over every input of the set together): 0 when removing P changes nothing, 1 when it takes
the whole effect away. Parts (each measured alone, so shares need not add up to 1: parts interact
through the network, and a removal can overshoot, share > 1):

- ``sta``: STA's term removed on every layer (G and its bias set to zero).
- ``router``: each layer's style weights s frozen at their mean over the input set, so the
  per-sample routing is gone but the average mixture of the A_i stays.
- ``styled_layers``: every layer with a router (n > 1) or STA removed (its adapter disabled).
- ``plain_layers``: every layer with plain low rank only (n = 1, no STA) removed.
- ``linear_layers`` / ``conv_layers``: the adapter on every ``nn.Linear`` (in SD UNets: the
  attention projections) / ``nn.Conv2d`` layer removed.

A part an adapter does not have gets ``None``. A comparison that rests on a part carrying less
than ``EXERCISED`` (10 %) of the effect is not interpretable as a test of that part.

The inputs are the ones the base model's own sampling feeds its UNet (``record_unet_inputs``): a
fixed prompt and seed set run through the pipeline with the adapter off, every UNet call recorded
at the chosen sampling steps (with classifier-free guidance both halves of the batch).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from styleinject.adapters.layers import StyleInjectLayer
from styleinject.adapters.model import adapters_disabled, set_adapter

EXERCISED = 0.10
PARTS = ("sta", "router", "styled_layers", "plain_layers", "linear_layers", "conv_layers")


def record_unet_inputs(pipe, prompts: list[str], *, seeds, steps: int, guidance: float, at_steps,
                       width: int | None = None, height: int | None = None) -> list[dict]:
    """The UNet's inputs (sample, timestep, encoder_hidden_states and any added conditioning) at
    sampling steps ``at_steps`` of the base model's own generation of ``prompts`` x ``seeds``."""
    from styleinject.pipeline import generate

    wanted = set(at_steps)
    recorded: list[dict] = []
    calls = {"n": 0}

    def hook(_module, args, kwargs):
        if calls["n"] % steps in wanted:
            names = ("sample", "timestep", "encoder_hidden_states")
            inputs = {**dict(zip(names, args)), **kwargs}
            recorded.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()
                             if k != "return_dict"})
        calls["n"] += 1

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with adapters_disabled(pipe.unet):
            for seed in seeds:
                calls["n"] = 0
                generate(pipe, prompts, seed=seed, steps=steps, guidance_scale=guidance, width=width, height=height)
                if calls["n"] != steps:
                    raise RuntimeError(f"expected {steps} UNet calls per generation, saw {calls['n']}: "
                                       "record_unet_inputs needs one batched UNet call per sampling step")
    finally:
        handle.remove()
    return recorded


def _predict(unet, inputs: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([unet(**{**x, "return_dict": False})[0].flatten() for x in inputs])


def _layers(unet, adapter_name: str) -> list[StyleInjectLayer]:
    return [m for m in unet.modules() if isinstance(m, StyleInjectLayer) and adapter_name in m.si_options]


def _styled(layer: StyleInjectLayer, adapter_name: str) -> bool:
    opts = layer.si_options[adapter_name]
    return opts["num_styles"] > 1 or opts["sta"]


@contextmanager
def _disabled(layers):
    states = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield
    finally:
        for layer, state in zip(layers, states, strict=True):
            layer.adapters_enabled = state


@contextmanager
def _without_sta(layers, adapter_name: str):
    changed = [layer for layer in layers if layer.si_options[adapter_name]["sta"]]
    for layer in changed:
        layer.si_options[adapter_name]["sta"] = False
    try:
        yield
    finally:
        for layer in changed:
            layer.si_options[adapter_name]["sta"] = True


@contextmanager
def _route_override(layer: StyleInjectLayer, fn):
    layer.__dict__["_route"] = fn  # an instance attribute shadows the method
    try:
        yield
    finally:
        del layer.__dict__["_route"]


def _mean_routes(unet, layers, inputs) -> dict[int, torch.Tensor]:
    """Each routed layer's style weights s averaged over every sample of every input."""
    sums: dict[int, list] = {}
    with ExitStack() as stack:
        for layer in layers:
            original = layer._route

            def recording(name, x, _original=original, _key=id(layer)):
                s = _original(name, x)
                if s is not None:
                    acc = sums.setdefault(_key, [0.0, 0])
                    acc[0] = acc[0] + s.detach().sum(dim=0)
                    acc[1] += s.shape[0]
                return s

            stack.enter_context(_route_override(layer, recording))
        _predict(unet, inputs)
    return {key: total / count for key, (total, count) in sums.items()}


def mechanism_shares(unet, inputs: list[dict], adapter_name: str = "default") -> dict:
    """Shares of ``adapter_name``'s effect on ``inputs`` carried by each part (module docstring).

    Returns ``{"effect_rel": ||E|| / ||eps_base||, "shares": {part: share or None},
    "exercised": {part: share >= EXERCISED or None}}``. The adapter is made active."""
    set_adapter(unet, adapter_name)
    layers = _layers(unet, adapter_name)
    with adapters_disabled(unet):
        base = _predict(unet, inputs)
    full = _predict(unet, inputs)
    effect = (full - base).norm().item()

    def share(context) -> float:
        with context:
            ablated = _predict(unet, inputs)
        return (full - ablated).norm().item() / effect if effect > 0 else float("nan")

    styled = [layer for layer in layers if _styled(layer, adapter_name)]
    plain = [layer for layer in layers if not _styled(layer, adapter_name)]
    routed = [layer for layer in layers if adapter_name in layer.si_router_weight
              and layer.si_options[adapter_name]["num_styles"] > 1]
    convs = [layer for layer in layers if layer.is_conv]
    linears = [layer for layer in layers if not layer.is_conv]
    shares: dict[str, float | None] = dict.fromkeys(PARTS)
    if any(layer.si_options[adapter_name]["sta"] for layer in layers):
        shares["sta"] = share(_without_sta(layers, adapter_name))
    if routed:
        means = _mean_routes(unet, routed, inputs)
        with ExitStack() as stack:
            for layer in routed:
                mean = means[id(layer)]
                stack.enter_context(_route_override(
                    layer, lambda name, x, _m=mean: _m.to(x.dtype).expand(x.shape[0], -1)))
            shares["router"] = share(ExitStack())
    if styled:
        shares["styled_layers"] = share(_disabled(styled))
    if plain:
        shares["plain_layers"] = share(_disabled(plain))
    if linears:
        shares["linear_layers"] = share(_disabled(linears))
    if convs:
        shares["conv_layers"] = share(_disabled(convs))
    return {"effect_rel": effect / base.norm().item(), "shares": shares,
            "exercised": {k: None if v is None else v >= EXERCISED for k, v in shares.items()}}
