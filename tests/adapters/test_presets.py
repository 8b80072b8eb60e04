"""The paper-counts preset (its parameter counts on SD 1.5, its extra parts) and the A_i init scale."""

import math

import pytest
import torch
from torch import nn

from styleinject import StyleInjectConfig, adapter_parameters, inject
from styleinject.adapters import adapter_state_dict, disable_adapters, set_adapter
from styleinject.adapters.config import PRESET_FIELDS
from styleinject.adapters.layers import StyleInjectLayer
from styleinject.names import ADAPTER_PRESETS


def test_paper_counts_preset_reproduces_the_papers_counts_on_sd15():
    from bench.param_counts import count, sd15_unet

    unet = sd15_unet()  # meta device: shapes only, nothing downloaded
    counts = {n: count(unet, StyleInjectConfig.paper_counts(n)) for n in (1, 4, 16)}
    assert {n: round(c / 1e6, 2) for n, c in counts.items()} == {1: 3.34, 4: 8.41, 16: 28.70}
    # each part is needed: without the router at n = 1, or without G's bias, the counts differ
    assert round(count(unet, StyleInjectConfig.paper_counts(1, keep_router=False)) / 1e6, 2) == 3.29
    assert round(count(unet, StyleInjectConfig.paper_counts(16, sta_bias=False)) / 1e6, 2) == 28.65
    # the text-faithful default (DMA + STA on to_q only) does not reach them
    assert round(count(unet, StyleInjectConfig(num_styles=16)) / 1e6, 2) == 15.97


def test_presets_fix_their_fields_and_refuse_clashes():
    assert tuple(PRESET_FIELDS) == ADAPTER_PRESETS
    assert StyleInjectConfig.from_preset("paper-text", rank=8) == StyleInjectConfig(rank=8)
    cfg = StyleInjectConfig.from_preset("paper-counts", num_styles=4, a_init="mixture")
    assert cfg == StyleInjectConfig.paper_counts(4, a_init="mixture")
    assert cfg.style_modules == ["to_q", "to_v"] and cfg.keep_router and cfg.sta_bias
    with pytest.raises(ValueError, match="preset paper-counts sets style_modules"):
        StyleInjectConfig.from_preset("paper-counts", style_modules=["to_q"])
    with pytest.raises(ValueError, match="preset must be one of paper-text, paper-counts"):
        StyleInjectConfig.from_preset("paper")
    # JSON: the new fields round-trip, and are left out at their defaults (older readers keep working)
    assert StyleInjectConfig.from_dict(cfg.to_dict()) == cfg
    assert not {"keep_router", "sta_bias", "a_init"} & set(StyleInjectConfig().to_dict())
    with pytest.raises(ValueError, match="a_init must be one of lora, mixture"):
        StyleInjectConfig(a_init="gaussian")


def test_preset_in_the_cli_and_the_api_schema():
    import argparse

    from api.schemas import TrainRequest
    from styleinject.train.cli import add_commands, config_from_args

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    base = ["finetune", "--base-model", "m", "--data", "d", "--output", "o"]
    args = parser.parse_args([*base, "--preset", "paper-counts", "--num-styles", "4", "--a-init", "mixture"])
    assert config_from_args(args).adapter == StyleInjectConfig.paper_counts(4, a_init="mixture")
    args = parser.parse_args([*base, "--preset", "paper-counts", "--style-targets", "to_v"])
    with pytest.raises(ValueError, match="sets style_modules"):
        config_from_args(args)

    body = TrainRequest(dataset_id="x", adapter={"preset": "paper-counts", "num_styles": 4})
    adapter = body.model_dump(exclude_none=True)["adapter"]
    assert "preset" not in adapter  # the worker builds StyleInjectConfig(**adapter)
    assert StyleInjectConfig(**adapter) == StyleInjectConfig.paper_counts(4)
    with pytest.raises(ValueError, match="sets style_modules"):
        TrainRequest(dataset_id="x", adapter={"preset": "paper-counts", "style_modules": ["to_q"]})


def test_paper_counts_parts_start_at_identity_and_serve_exactly(tiny_unet, unet_inputs):
    """The router kept at n = 1 and G's bias leave the model equal to its base at init; trained
    (random) weights give the same output through the serving slots, which fold the bias into G."""
    from styleinject.serving.slots import SlotTable

    unet = tiny_unet.double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in unet_inputs.items()}
    with torch.no_grad():
        base = unet(**inputs).sample
    configs = {"n1": StyleInjectConfig.paper_counts(1, rank=4), "n3": StyleInjectConfig.paper_counts(3, rank=4)}
    for name, cfg in configs.items():
        inject(unet, cfg, name)
        kinds = {k.rsplit(".", 1)[1] for k in adapter_state_dict(unet, name)}
        assert {"si_router_weight", "si_G_bias"} <= kinds
        with torch.no_grad():
            torch.testing.assert_close(unet(**inputs).sample, base, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(0)
    solo = {}
    for name in configs:
        with torch.no_grad():
            for p in adapter_parameters(unet, name):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
        set_adapter(unet, name)
        with torch.no_grad():
            solo[name] = unet(**inputs).sample
        assert (solo[name] - base).abs().max() > 1e-2
    disable_adapters(unet)
    table = SlotTable(unet, num_slots=3)
    for name, cfg in configs.items():
        tensors = {k: v.detach().clone() for k, v in adapter_state_dict(unet, name).items()}
        slot = table.acquire(name, cfg, tensors)
        table.set_batch(torch.tensor([slot, slot]))
        with torch.no_grad():
            torch.testing.assert_close(unet(**inputs).sample, solo[name], rtol=1e-10, atol=1e-12)
    table.set_batch(None)


def _mixture_std(a_init: str, n: int, fan_in: int = 512, seed: int = 0) -> tuple[float, float]:
    """(std of the initial mixture sum_i s_i A_i with a uniform router, std of a LoRA A)."""
    torch.manual_seed(seed)
    layer = StyleInjectLayer(nn.Linear(fan_in, fan_in))
    cfg = StyleInjectConfig(rank=64, num_styles=n, target_modules=["x"], style_modules=["x"], a_init=a_init)
    layer.add_adapter("a", cfg.layer_options("x", conv=False))
    A = layer.si_A["a"].detach()
    uniform = torch.full((n,), 1.0 / n)
    mixture = torch.einsum("n,nrc->rc", uniform, A)
    lora_std = 1 / math.sqrt(3 * fan_in)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return mixture.std().item(), lora_std


@pytest.mark.parametrize("n", [4, 16])
def test_a_init_mixture_matches_a_lora_a_under_a_uniform_router(n):
    lora_like, lora_std = _mixture_std("lora", n)
    mixture, _ = _mixture_std("mixture", n)
    assert lora_like / lora_std == pytest.approx(1 / math.sqrt(n), rel=0.03)  # the confound
    assert mixture / lora_std == pytest.approx(1.0, rel=0.03)  # the fix
    single, _ = _mixture_std("mixture", 1)  # n = 1: both options are the LoRA init
    assert single / lora_std == pytest.approx(1.0, rel=0.03)
