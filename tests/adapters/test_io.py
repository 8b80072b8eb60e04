import json

import pytest
import torch
from safetensors import safe_open

from styleinject import AdapterLoadError, StyleInjectConfig, adapter_parameters, inject, list_adapters, load_adapter, save_adapter
from styleinject.adapters import adapter_state_dict, read_adapter_metadata
from styleinject.testing import tiny_components

CFG = StyleInjectConfig(rank=4, num_styles=3, conv_target_modules=["conv1"], style_modules=["to_q", "conv1"])


def _trained(cfg=CFG, seed=0):
    unet = tiny_components()["unet"].eval()
    inject(unet, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return unet


def _out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def _snapshot(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_save_then_load_into_fresh_model_reproduces_outputs(tmp_path, unet_inputs):
    unet = _trained()
    save_adapter(unet, tmp_path / "ad", metadata={"kind": "finetune", "steps": 7})
    fresh = tiny_components()["unet"].eval()
    load_adapter(fresh, tmp_path / "ad", adapter_name="other")
    assert list_adapters(fresh) == ["other"]
    torch.testing.assert_close(_out(fresh, unet_inputs), _out(unet, unet_inputs), rtol=0, atol=0)
    meta = read_adapter_metadata(tmp_path / "ad")
    assert meta["kind"] == "finetune" and meta["steps"] == "7" and meta["styleinject_format_version"] == "1"
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["adapter_type"] == "styleinject" and config["num_styles"] == 3
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(adapter_state_dict(unet)) and all(".si_" in k for k in keys)


def test_loading_over_a_resident_adapter_copies_in_place(tmp_path, unet_inputs):
    first, second = _trained(seed=0), _trained(seed=1)
    save_adapter(first, tmp_path / "one")
    save_adapter(second, tmp_path / "two")
    model = tiny_components()["unet"].eval()
    load_adapter(model, tmp_path / "one")
    params = {k: v.data_ptr() for k, v in adapter_state_dict(model).items()}
    load_adapter(model, tmp_path / "two")
    assert {k: v.data_ptr() for k, v in adapter_state_dict(model).items()} == params
    torch.testing.assert_close(_out(model, unet_inputs), _out(second, unet_inputs), rtol=0, atol=0)


def test_mismatched_model_is_a_clear_error_and_leaves_model_unchanged(tmp_path, unet_inputs):
    save_adapter(_trained(), tmp_path / "ad")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    other = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=32,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                 cross_attention_dim=32, norm_num_groups=2).eval()
    before = _snapshot(other)
    with pytest.raises(AdapterLoadError, match="does not match this model") as err:
        load_adapter(other, tmp_path / "ad")
    assert "file has shape" in str(err.value)
    assert list_adapters(other) == []
    after = _snapshot(other)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_other_shapes_under_a_loaded_name_is_refused(tmp_path):
    save_adapter(_trained(StyleInjectConfig(rank=2, num_styles=2)), tmp_path / "small")
    model = _trained()
    before = _snapshot(model)
    with pytest.raises(AdapterLoadError):
        load_adapter(model, tmp_path / "small")
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_weights", "bad_json", "nan"])
def test_corrupt_files_give_clear_errors(tmp_path, damage):
    unet = _trained()
    if damage == "nan":
        with torch.no_grad():
            adapter_parameters(unet)[0][0] = float("nan")
    folder = save_adapter(unet, tmp_path / "ad")
    weights = folder / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbage":
        weights.write_bytes(b"\x80\x04not a safetensors file, maybe a pickle")
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "bad_json":
        (folder / "adapter_config.json").write_text("{not json")
    model = tiny_components()["unet"].eval()
    before = _snapshot(model)
    with pytest.raises(AdapterLoadError, match=str(folder)):
        load_adapter(model, folder)
    assert list_adapters(model) == []
    assert all(torch.equal(before[k], v) for k, v in _snapshot(model).items())


def test_missing_folder_and_foreign_config(tmp_path):
    with pytest.raises(AdapterLoadError, match="is not a folder"):
        load_adapter(tiny_components()["unet"], tmp_path / "missing")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(AdapterLoadError, match="unknown StyleInjectConfig fields"):
        load_adapter(tiny_components()["unet"], tmp_path / "peft")
