"""Each wrapped layer against an independent float64 reference of Eq. (2) (DMA) and Eq. (4) (STA)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from styleinject import StyleInjectConfig, inject
from styleinject.adapters import adapter_state_dict


def _randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".si_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def _reference(x, base, tensors, scale, conv):
    """Eq. (2) and Eq. (4) written out plainly: n separate projections, AdaIN with an explicit sigma."""
    A, B = tensors["si_A"], tensors["si_B"]
    n = A.shape[0]
    out = []
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        if conv:
            h = base(xb)
            pooled = xb.mean(dim=(2, 3))
        else:
            h = base(xb)
            pooled = xb.reshape(1, -1, xb.shape[-1]).mean(dim=1)
        if n > 1:
            s = torch.softmax(pooled @ tensors["si_router_weight"].T + tensors["si_router_bias"], dim=-1)[0]
        else:
            s = torch.ones(1, dtype=x.dtype)
        delta = 0
        for i in range(n):
            if conv:
                z = F.conv2d(xb, A[i], stride=base.stride, padding=base.padding, dilation=base.dilation)
                delta = delta + s[i] * torch.einsum("or,brhw->bohw", B, z)
            else:
                delta = delta + s[i] * (xb @ A[i].T) @ B.T
        delta = scale * delta
        if "si_G" in tensors:
            dims = (2, 3) if conv else (1,)
            hh = h if conv else h.reshape(1, -1, h.shape[-1])
            mu = hh.mean(dim=dims, keepdim=True)
            sigma = hh.std(dim=dims, keepdim=True, unbiased=False)
            f = sigma * (1 + (tensors["si_G"] @ s).reshape((1, -1, 1, 1) if conv else (1, 1, -1)))
            # one token (a (B, C) input): h = mu, the normalised part is 0 (documented limit)
            normalised = torch.where(sigma > 0, (hh - mu) / sigma.clamp_min(1e-300), torch.zeros_like(hh))
            h = (normalised * f + mu).reshape(h.shape)
        out.append(h + delta)
    return torch.cat(out)


VARIANTS = {
    "dma+sta": dict(num_styles=3, dma=True, sta=True),
    "dma-only": dict(num_styles=3, dma=True, sta=False),
    "sta-only": dict(num_styles=3, dma=False, sta=True),
    "lora": dict(num_styles=3, dma=True, sta=True, style_modules=[]),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(2, 5, 6), (3, 6), (2, 2, 3, 6)], ids=["BLC", "BC", "BHWC"])
def test_linear_matches_reference(variant, shape):
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(6, 5)}).double()
    options = {"style_modules": ["proj"], **VARIANTS[variant]}
    inject(model, StyleInjectConfig(rank=2, alpha=3.0, target_modules=["proj"], **options))
    _randomise(model)
    x = torch.randn(shape, dtype=torch.float64)
    layer = model["proj"]
    got = layer(x)
    tensors = {k.split(".")[-1]: v.detach() for k, v in adapter_state_dict(model).items()}
    want = _reference(x, layer.base_layer, tensors, scale=1.5, conv=False)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    expected_n = 1 if variant in ("sta-only", "lora") else 3
    assert tensors["si_A"].shape[0] == expected_n
    assert ("si_G" in tensors) == (variant in ("dma+sta", "sta-only"))
    assert ("si_router_weight" in tensors) == (expected_n > 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("conv", [dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=1), dict(kernel_size=(3, 1), padding=(2, 0), dilation=2)],
                         ids=["k3", "k3s2", "k1", "k31d2"])
def test_conv_matches_reference(variant, conv):
    torch.manual_seed(0)
    model = nn.ModuleDict({"conv1": nn.Conv2d(4, 5, **conv)}).double()
    options = {"style_modules": ["conv1"], **VARIANTS[variant]}
    inject(model, StyleInjectConfig(rank=2, alpha=3.0, target_modules=[], conv_target_modules=["conv1"], **options))
    _randomise(model)
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    layer = model["conv1"]
    got = layer(x)
    tensors = {k.split(".")[-1]: v.detach() for k, v in adapter_state_dict(model).items()}
    want = _reference(x, layer.base_layer, tensors, scale=1.5, conv=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_router_gives_each_sample_its_own_mixture():
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(6, 5)}).double()
    inject(model, StyleInjectConfig(rank=2, num_styles=4, target_modules=["proj"], style_modules=["proj"]))
    _randomise(model)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    batched = model["proj"](x)
    one_by_one = torch.cat([model["proj"](x[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-12, atol=1e-12)


def test_adapter_scale_interpolates_between_base_and_adapter():
    from styleinject import set_adapter_scale

    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(6, 5)}).double()
    inject(model, StyleInjectConfig(rank=2, num_styles=2, target_modules=["proj"], style_modules=["proj"]))
    _randomise(model)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    base = model["proj"].base_layer(x)
    full = model["proj"](x)
    set_adapter_scale(model, "default", 0.25)
    torch.testing.assert_close(model["proj"](x), base + 0.25 * (full - base))
    set_adapter_scale(model, "default", 0.0)
    torch.testing.assert_close(model["proj"](x), base)
