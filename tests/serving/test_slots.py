"""Stacked adapter slots: exact against the named-adapter path, no leaks, in-place swaps, no recompiles."""

import pytest
import torch

from styleinject import StyleInjectConfig, adapter_parameters, inject
from styleinject.adapters import adapter_state_dict, disable_adapters, set_adapter, set_adapter_scale
from styleinject.serving.slots import SlotsBusy, SlotTable

CONFIGS = {
    "a": StyleInjectConfig(rank=4, num_styles=2),
    "b": StyleInjectConfig(rank=2, num_styles=3, conv_target_modules=["conv1"], style_modules=["to_q", "conv1"]),
    "lora": StyleInjectConfig.lora(rank=3),
}


def _randomise(unet, name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet, name):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def _tensors(unet, name):
    return {k: v.detach().clone() for k, v in adapter_state_dict(unet, name).items()}


def _out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.fixture
def unet64(tiny_unet, unet_inputs):
    """The tiny UNet in float64 with three named adapters of different shapes (random weights)."""
    unet = tiny_unet.double()
    for seed, (name, cfg) in enumerate(CONFIGS.items()):
        inject(unet, cfg, name)
        _randomise(unet, name, seed)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in unet_inputs.items()}
    return unet, inputs


def _solo(unet, inputs):
    solo = {}
    for name in CONFIGS:
        set_adapter(unet, name)
        solo[name] = _out(unet, inputs)
    disable_adapters(unet)
    solo[None] = _out(unet, inputs)
    return solo


def test_slots_equal_named_adapters_in_float64_and_never_leak(unet64):
    unet, inputs = unet64
    solo = _solo(unet, inputs)
    table = SlotTable(unet, num_slots=4)
    slots = {name: table.acquire(name, CONFIGS[name], _tensors(unet, name)) for name in CONFIGS}
    assert sorted(slots.values()) == [1, 2, 3]
    # every adapter alone in a batch, then all pairs mixed (padding to r=4, n=3 must be exact)
    for name, slot in slots.items():
        table.set_batch(torch.tensor([slot, slot]))
        torch.testing.assert_close(_out(unet, inputs), solo[name], rtol=1e-10, atol=1e-12)
    for first in [*CONFIGS, None]:
        for second in [*CONFIGS, None]:
            table.set_batch(torch.tensor([slots.get(first, 0), slots.get(second, 0)]))
            mixed = _out(unet, inputs)
            torch.testing.assert_close(mixed[0], solo[first][0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(mixed[1], solo[second][1], rtol=1e-10, atol=1e-12)
    assert min((solo[a] - solo[b]).abs().max() for a in solo for b in solo if a != b) > 1e-2
    table.set_batch(None)  # back to the named adapters
    set_adapter(unet, "a")
    torch.testing.assert_close(_out(unet, inputs), solo["a"], rtol=0, atol=0)


def test_per_sample_scale_and_several_adapters_per_sample(unet64):
    unet, inputs = unet64
    table = SlotTable(unet, num_slots=4)
    slot_a = table.acquire("a", CONFIGS["a"], _tensors(unet, "a"))
    slot_b = table.acquire("b", CONFIGS["b"], _tensors(unet, "b"))
    set_adapter(unet, "a")
    set_adapter_scale(unet, "a", 0.5)
    half = _out(unet, inputs)
    set_adapter_scale(unet, "a", 1.0)
    table.set_batch(torch.tensor([slot_a, slot_a]), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(_out(unet, inputs), half, rtol=1e-10, atol=1e-12)
    # two adapters on one sample: each wrapped layer adds w_a Delta_a + w_b Delta_b (checked per layer)
    layer = next(m for n, m in unet.named_modules() if n.endswith("attn1.to_q"))
    x = torch.randn(2, 5, layer.base_layer.in_features, dtype=torch.float64)
    h = layer.base_layer(x)
    want = h + 0.7 * layer._delta("a", x, h) + 0.2 * layer._delta("b", x, h)
    table.set_batch(torch.tensor([[slot_a, slot_b], [slot_a, slot_b]]), torch.tensor([[0.7, 0.2], [0.7, 0.2]], dtype=torch.float64))
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-12)
    table.set_batch(None)


def test_swap_is_an_in_place_copy_and_lru_evicts_only_unpinned(unet64):
    unet, _ = unet64
    table = SlotTable(unet, num_slots=3)
    table.prepare(CONFIGS["b"])
    table.prepare(CONFIGS["a"])
    buffers = {id(b): b.data_ptr() for b in unet.buffers()}
    slot_a = table.acquire("a", CONFIGS["a"], _tensors(unet, "a"))
    slot_b = table.acquire("b", CONFIGS["b"], _tensors(unet, "b"))
    with pytest.raises(SlotsBusy):
        table.acquire("lora", CONFIGS["lora"], _tensors(unet, "lora"))
    table.release("a")
    assert table.acquire("lora", CONFIGS["lora"], _tensors(unet, "lora")) == slot_a  # a was evicted
    assert {id(b): b.data_ptr() for b in unet.buffers()} == buffers  # no allocation, no rebuild
    assert table.stats.evictions == 1 and table.stats.misses == 3
    assert table.acquire("b", CONFIGS["b"], _tensors(unet, "b")) == slot_b and table.stats.hits == 1


def test_no_recompile_across_swaps_and_mixes(tiny_unet, unet_inputs):
    from torch._dynamo.utils import counters

    unet = tiny_unet
    names = list(CONFIGS)
    for seed, name in enumerate(names):
        inject(unet, CONFIGS[name], name)
        _randomise(unet, name, seed)
    tensors = {name: _tensors(unet, name) for name in names}
    table = SlotTable(unet, num_slots=3)
    for cfg in CONFIGS.values():  # size the table once (the one allowed shape change)
        table.prepare(cfg)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="aot_eager")
    eager = {}
    slot_a = table.acquire("a", CONFIGS["a"], tensors["a"])
    for step, (first, second) in enumerate([("a", None), ("b", "a"), ("lora", "lora"), (None, "b")]):
        for name in (first, second):  # swap in what this batch needs, evicting what it does not
            if name is not None and name not in table.resident():
                for other in table.resident():
                    if other not in (first, second):
                        table.release(other)
                table.acquire(name, CONFIGS[name], tensors[name])
        ids = [0 if n is None else table._resident[n].slot for n in (first, second)]
        table.set_batch(torch.tensor(ids), torch.tensor([1.0, 0.8]))
        with torch.no_grad():
            got = compiled(**unet_inputs).sample
            eager[step] = unet(**unet_inputs).sample
        torch.testing.assert_close(got, eager[step], rtol=1e-4, atol=1e-5)
    assert slot_a == 1
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    table.set_batch(None)
