"""LoRA mode (n = 1, no router, no STA) equals PEFT's LoRA with the same weights."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from styleinject import StyleInjectConfig, inject
from styleinject.adapters import adapter_state_dict
from styleinject.testing import tiny_components


@pytest.mark.parametrize("with_conv", [False, True], ids=["attn", "attn+conv"])
def test_lora_mode_equals_peft_lora(unet_inputs, with_conv):
    targets = ["to_q", "to_v"] + (["conv1", "conv2"] if with_conv else [])
    ours = tiny_components()["unet"].eval()
    inject(ours, StyleInjectConfig.lora(rank=4, alpha=8, target_modules=["to_q", "to_v"],
                                        conv_target_modules=["conv1", "conv2"] if with_conv else []))
    theirs = tiny_components()["unet"].eval()
    theirs = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), theirs)

    gen = torch.Generator().manual_seed(0)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, param in adapter_state_dict(ours).items():
            layer, kind = key.rsplit(".", 1)
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            if kind == "si_A":
                theirs_params[f"{layer}.lora_A.default.weight"].copy_(param[0])
            else:
                peft_B = theirs_params[f"{layer}.lora_B.default.weight"]
                peft_B.copy_(param.reshape(peft_B.shape))
    n_lora = sum(1 for n in theirs_params if "lora_" in n)
    assert n_lora == len(adapter_state_dict(ours))  # A and B per layer on both sides
    with torch.no_grad():
        a = ours(**unet_inputs).sample
        b = theirs(**unet_inputs).sample
        base = tiny_components()["unet"].eval()(**unet_inputs).sample
    assert (a - base).abs().max() > 1e-2  # the weights matter
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
