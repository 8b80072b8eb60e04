import pytest
import torch

from styleinject import (
    StyleInjectConfig,
    adapter_parameters,
    count_parameters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    inject,
    list_adapters,
    set_adapter,
)
from styleinject.adapters import StyleInjectLayer, active_adapter

PAPER = StyleInjectConfig()  # r = 32, n = 16, alpha = r, DMA+STA on to_q, low rank on to_v
CONV = StyleInjectConfig(conv_target_modules=["conv1", "conv2"], style_modules=["to_q", "conv1", "conv2"])


def _out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.mark.parametrize("cfg", [PAPER, CONV, StyleInjectConfig.lora(rank=4)], ids=["paper", "conv", "lora"])
def test_identity_at_init(tiny_unet, unet_inputs, cfg):
    before = _out(tiny_unet, unet_inputs)
    inject(tiny_unet, cfg)
    after = _out(tiny_unet, unet_inputs)
    assert (after - before).abs().max().item() <= 1e-6
    wrapped = [n for n, m in tiny_unet.named_modules() if isinstance(m, StyleInjectLayer)]
    assert all(n.endswith(("to_q", "to_v", "conv1", "conv2")) for n in wrapped)
    assert any(n.endswith("conv1") for n in wrapped) == bool(cfg.conv_target_modules)


def test_paper_defaults_place_dma_sta_on_to_q_and_low_rank_on_to_v(tiny_unet):
    inject(tiny_unet, PAPER)
    for name, module in tiny_unet.named_modules():
        if name.endswith("to_q"):
            assert module.si_A["default"].shape[:2] == (16, 32)
            assert "default" in module.si_G and "default" in module.si_router_weight
        if name.endswith("to_v"):
            assert module.si_A["default"].shape[:2] == (1, 32)
            assert "default" not in module.si_G and "default" not in module.si_router_weight


def test_gradients_reach_every_adapter_parameter_and_base_stays_frozen(tiny_unet, unet_inputs):
    base = {n: p.detach().clone() for n, p in tiny_unet.named_parameters()}
    inject(tiny_unet, StyleInjectConfig(rank=4, num_styles=3, conv_target_modules=["conv1"],
                                        style_modules=["to_q", "conv1"]))
    params = adapter_parameters(tiny_unet)
    assert params and all(p.requires_grad for p in params)
    assert all(not p.requires_grad for n, p in tiny_unet.named_parameters() if ".si_" not in n)
    opt = torch.optim.AdamW(params, lr=1e-2)
    target = torch.randn_like(unet_inputs["sample"])
    seen = {id(p): False for p in params}
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(tiny_unet(**unet_inputs).sample, target)
        loss.backward()
        for p in params:
            if p.grad is not None and p.grad.abs().sum() > 0:
                seen[id(p)] = True
        opt.step()
    names = {id(p): n for n, p in tiny_unet.named_parameters()}
    assert all(seen.values()), [names[i] for i, ok in seen.items() if not ok]
    for name, p in tiny_unet.named_parameters():
        if ".si_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base[key]), name


def test_named_adapters_switch_disable_and_delete(tiny_unet, unet_inputs):
    plain = _out(tiny_unet, unet_inputs)
    inject(tiny_unet, StyleInjectConfig(rank=4, num_styles=2), "a")
    inject(tiny_unet, StyleInjectConfig(rank=2, num_styles=3), "b")
    assert list_adapters(tiny_unet) == ["a", "b"] and active_adapter(tiny_unet) == "b"
    assert all(not p.requires_grad for p in adapter_parameters(tiny_unet, "a"))
    with torch.no_grad():
        for name in ("a", "b"):
            for p in adapter_parameters(tiny_unet, name):
                p.normal_(0, 0.2)
    out_b = _out(tiny_unet, unet_inputs)
    set_adapter(tiny_unet, "a")
    out_a = _out(tiny_unet, unet_inputs)
    assert (out_a - out_b).abs().max() > 1e-3 and (out_a - plain).abs().max() > 1e-3
    disable_adapters(tiny_unet)
    torch.testing.assert_close(_out(tiny_unet, unet_inputs), plain, rtol=0, atol=0)
    enable_adapters(tiny_unet)
    torch.testing.assert_close(_out(tiny_unet, unet_inputs), out_a, rtol=0, atol=0)
    delete_adapter(tiny_unet, "a")
    assert active_adapter(tiny_unet) is None
    torch.testing.assert_close(_out(tiny_unet, unet_inputs), plain, rtol=0, atol=0)
    delete_adapter(tiny_unet, "b")
    assert not any(isinstance(m, StyleInjectLayer) for m in tiny_unet.modules())
    assert count_parameters(tiny_unet) == 0


def test_parameter_count_matches_formula(tiny_unet):
    inject(tiny_unet, StyleInjectConfig(rank=4, num_styles=3))
    expected = 0
    for name, module in tiny_unet.named_modules():
        if isinstance(module, StyleInjectLayer):
            fan_in, out = module.base_layer.in_features, module.base_layer.out_features
            if name.endswith("to_q"):
                expected += 3 * 4 * fan_in + out * 4 + (3 * fan_in + 3) + out * 3
            else:
                expected += 4 * fan_in + out * 4
    assert count_parameters(tiny_unet, "default") == expected


def test_errors_are_clear(tiny_unet):
    with pytest.raises(ValueError, match="no layer matched"):
        inject(tiny_unet, StyleInjectConfig(target_modules=["nope"]))
    inject(tiny_unet, StyleInjectConfig(rank=2, num_styles=2))
    with pytest.raises(ValueError, match="already has an adapter"):
        inject(tiny_unet, StyleInjectConfig(rank=2, num_styles=2))
    with pytest.raises(KeyError, match="no adapter named 'x'"):
        set_adapter(tiny_unet, "x")
    with pytest.raises(ValueError, match="num_styles must be >= 1"):
        StyleInjectConfig(num_styles=0)
    with pytest.raises(ValueError, match="may only hold"):
        inject(tiny_unet, StyleInjectConfig(rank=2), "bad.name")


def test_regex_targets():
    from styleinject.testing import tiny_components

    unet = tiny_components()["unet"]
    inject(unet, StyleInjectConfig(rank=2, target_modules=[r"up_blocks\..*attn1\.to_q"], style_modules=[]))
    wrapped = [n for n, m in unet.named_modules() if isinstance(m, StyleInjectLayer)]
    assert wrapped and all(n.startswith("up_blocks") and n.endswith("attn1.to_q") for n in wrapped)


def test_config_json_roundtrip(tmp_path):
    cfg = StyleInjectConfig(rank=8, num_styles=4, alpha=16, conv_target_modules=["conv1"], sta=False)
    cfg.save(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    assert '"adapter_type": "styleinject"' in text
    assert StyleInjectConfig.load(tmp_path) == cfg


def test_expected_shapes_count_what_inject_creates(tiny_unet):
    """bench/param_counts.py counts with expected_state_shapes; it must agree with real injection."""
    import math

    from styleinject.adapters.model import expected_state_shapes

    cfg = StyleInjectConfig(rank=4, num_styles=3, conv_target_modules=["conv1"], style_modules=["to_q", "conv1"])
    planned = sum(math.prod(s) for s in expected_state_shapes(tiny_unet, cfg).values())
    inject(tiny_unet, cfg)
    assert count_parameters(tiny_unet) == planned
