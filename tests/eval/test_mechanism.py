"""Mechanism shares on the tiny UNet: planted parts give the shares they must."""

import pytest
import torch

from styleinject import StyleInjectConfig, adapter_parameters, inject
from styleinject.adapters import adapter_state_dict
from styleinject.eval.mechanism import mechanism_shares

# DMA + STA on to_q, plain low rank on to_v and on the resnet conv1 (n = 3 styles)
CFG = StyleInjectConfig(rank=4, num_styles=3, conv_target_modules=["conv1"])


@pytest.fixture
def adapted(tiny_unet, unet_inputs):
    unet = tiny_unet.double()
    inject(unet, CFG)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    inputs = [{k: v.double() if v.is_floating_point() else v for k, v in unet_inputs.items()}]
    return unet, inputs


def _zero(unet, suffix, where=lambda key: True):
    with torch.no_grad():
        for key, p in adapter_state_dict(unet).items():
            if key.endswith(suffix) and where(key):
                p.zero_()


def test_every_part_is_measured_and_the_effect_is_real(adapted):
    unet, inputs = adapted
    out = mechanism_shares(unet, inputs)
    assert out["effect_rel"] > 1e-3
    assert all(0 < v for v in out["shares"].values()), out
    assert out["exercised"]["conv_layers"] in (True, False)


def test_zero_G_gives_sta_share_zero(adapted):
    unet, inputs = adapted
    _zero(unet, ".si_G")
    out = mechanism_shares(unet, inputs)
    assert out["shares"]["sta"] == 0.0 and out["exercised"]["sta"] is False
    assert out["shares"]["router"] > 1e-4  # two samples: their routes differ a little


def test_only_sta_left_gives_sta_share_one(adapted):
    unet, inputs = adapted
    _zero(unet, ".si_B")  # no low-rank update anywhere: STA is the whole effect
    out = mechanism_shares(unet, inputs)
    assert out["shares"]["sta"] == pytest.approx(1.0, abs=1e-12)
    assert out["shares"]["styled_layers"] == pytest.approx(1.0, abs=1e-12)
    assert out["shares"]["plain_layers"] == 0.0 and out["shares"]["conv_layers"] == 0.0


def test_constant_router_gives_router_share_zero(adapted):
    unet, inputs = adapted
    _zero(unet, ".si_router_weight")  # s = softmax(bias): the same for every sample = its mean
    out = mechanism_shares(unet, inputs)
    assert out["shares"]["router"] == pytest.approx(0.0, abs=1e-12)
    assert out["shares"]["sta"] > 0.01


def test_plain_layers_only_and_absent_parts(adapted, tiny_unet):
    unet, inputs = adapted
    _zero(unet, ".si_B", where=lambda key: "to_q" in key)
    _zero(unet, ".si_G")  # the styled layers (to_q) now add nothing: plain layers carry it all
    out = mechanism_shares(unet, inputs)
    assert out["shares"]["styled_layers"] == 0.0
    assert out["shares"]["plain_layers"] == pytest.approx(1.0, abs=1e-12)
    lora = StyleInjectConfig.lora(rank=2)
    inject(unet, lora, "lora")
    out = mechanism_shares(unet, inputs, "lora")  # B = 0 at init: no effect, and no router / STA
    assert out["shares"]["sta"] is None and out["shares"]["router"] is None and out["shares"]["conv_layers"] is None
