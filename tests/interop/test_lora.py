"""LoRA files in and out, checked against diffusers and PEFT themselves on the tiny pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from styleinject import StyleInjectConfig, adapter_parameters, inject, save_adapter
from styleinject.adapters.model import plan
from styleinject.interop import LoraFormatError, export_lora, import_lora
from styleinject.interop.tensorfile import RawTensor, read_tensors, write_tensors
from styleinject.pipeline import generate, load_pipeline

KW = dict(steps=2, width=64, height=64, guidance_scale=7.5)
PROMPT, SEED = "a red square", 3
TO_Q = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
# LoRA mode with what LoRA files carry: another rank and alpha on some modules, conv layers too
LORA_CFG = dict(rank=4, alpha=2, num_styles=1, dma=False, sta=False, style_modules=[],
                target_modules=["to_q", "to_v"], conv_target_modules=["conv1"], conv_rank=2, conv_alpha=3,
                rank_pattern={TO_Q: 3}, alpha_pattern={"to_v": 5})


def _px(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def _unet(path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path, subfolder="unet")


def _random_adapter(path, out, cfg: StyleInjectConfig, seed: int = 0):
    unet = _unet(path)
    inject(unet, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return save_adapter(unet, out)


def _diffusers_image(path, lora_file) -> np.ndarray:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None)
    ref.scheduler = EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    if lora_file is not None:
        ref.load_lora_weights(str(lora_file))
    return _px(ref(PROMPT, num_inference_steps=KW["steps"], width=64, height=64, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(SEED)).images)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_path):
    return load_pipeline(tiny_pipeline_path, device="cpu")


def test_exported_diffusers_file_loads_in_diffusers_with_the_same_image(pipe, tiny_pipeline_path, tmp_path):
    folder = _random_adapter(tiny_pipeline_path, tmp_path / "ours", StyleInjectConfig(**LORA_CFG))
    lora = export_lora(folder, tmp_path / "lora.safetensors", format="diffusers")
    ours = _px(generate(pipe, PROMPT, seed=SEED, adapter=folder, **KW))
    theirs = _diffusers_image(tiny_pipeline_path, lora)
    base = _diffusers_image(tiny_pipeline_path, None)
    assert np.abs(ours - base).max() > 50  # the adapter matters
    assert np.abs(ours - theirs).max() <= 1  # float rounding only: ranks and alphas per module kept


def test_a_peft_lora_saved_by_diffusers_imports_to_the_same_image(pipe, tiny_pipeline_path, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _unet(tiny_pipeline_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                        rank_pattern={TO_Q: 2}, alpha_pattern={"to_k": 2}, init_lora_weights=False)
    unet.add_adapter(config)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # PEFT's random init is small on B; make the effect plain
                param.mul_(30)
    metadata = {k: v for k, v in config.to_dict().items() if k in ("r", "lora_alpha", "rank_pattern",
                                                                    "alpha_pattern", "target_modules")}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionPipeline.save_lora_weights(tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=metadata)
    lora = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    assert any(k.startswith("unet.") and ".lora_A." in k for k in read_tensors(lora)[0])

    folder = import_lora(lora, tmp_path / "imported", base_model=tiny_pipeline_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["num_styles"] == 1 and not cfg["dma"] and not cfg["sta"]
    assert cfg["rank_pattern"] == {TO_Q: 2}
    ours = _px(generate(pipe, PROMPT, seed=SEED, adapter=folder, **KW))
    theirs = _diffusers_image(tiny_pipeline_path, lora)
    assert np.abs(ours - _diffusers_image(tiny_pipeline_path, None)).max() > 50
    assert np.abs(ours - theirs).max() <= 1


def test_kohya_round_trip_is_bit_identical(tiny_pipeline_path, tmp_path):
    folder = _random_adapter(tiny_pipeline_path, tmp_path / "ours", StyleInjectConfig(**LORA_CFG))
    kohya = export_lora(folder, tmp_path / "k.safetensors", format="kohya")
    keys = set(read_tensors(kohya)[0])
    assert f"lora_unet_{TO_Q.replace('.', '_')}.lora_down.weight" in keys
    assert f"lora_unet_{TO_Q.replace('.', '_')}.alpha" in keys

    again = import_lora(kohya, tmp_path / "imported", base_model=tiny_pipeline_path)
    original, imported = read_tensors(folder / "adapter_model.safetensors")[0], read_tensors(again / "adapter_model.safetensors")[0]
    assert original == imported  # same keys, dtypes, shapes and bytes
    unet = _unet(tiny_pipeline_path)
    before = {n: o for n, _, o in plan(unet, StyleInjectConfig.load(folder))}
    after = {n: o for n, _, o in plan(unet, StyleInjectConfig.load(again))}
    assert before == after  # every layer's rank and scale alpha / r
    assert len({o["scale"] for o in after.values()}) == 4  # 2/4, 2/3 (TO_Q), 5/4, 3/2: alphas travelled
    assert read_tensors(export_lora(again, tmp_path / "k2.safetensors", format="kohya"))[0] == read_tensors(kohya)[0]
    # without a base model, kohya's '_' names are split by diffusers' naming: the same adapter
    blind = import_lora(kohya, tmp_path / "blind")
    assert read_tensors(blind / "adapter_model.safetensors")[0] == original


def test_a_styleinject_adapter_with_dma_or_sta_is_refused(tiny_pipeline_path, tmp_path):
    folder = _random_adapter(tiny_pipeline_path, tmp_path / "dma", StyleInjectConfig(rank=4, num_styles=2))
    with pytest.raises(LoraFormatError, match="DMA and STA") as info:
        export_lora(folder, tmp_path / "x.safetensors", format="kohya")
    assert "styleinject.load_adapter" in str(info.value) and "depend on each input" in str(info.value)
    assert not (tmp_path / "x.safetensors").exists()


def _lora_file(path, keys: dict[str, tuple[int, ...]]):
    tensors = {k: RawTensor("F32", shape, np.ones(shape, "<f4").tobytes()) for k, shape in keys.items()}
    write_tensors(path, tensors)
    return path


def test_unmatched_unknown_and_text_encoder_keys_are_listed_and_nothing_is_written(tiny_pipeline_path, tmp_path):
    out = tmp_path / "out"
    good = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    wrong = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    unmatched = _lora_file(tmp_path / "unmatched.safetensors", {
        f"{good}.lora_down.weight": (2, 8), f"{good}.lora_up.weight": (8, 2),
        f"{wrong}.lora_down.weight": (2, 8), f"{wrong}.lora_up.weight": (8, 2)})
    with pytest.raises(LoraFormatError, match="1 LoRA modules match no") as info:
        import_lora(unmatched, out, base_model=tiny_pipeline_path)
    assert wrong in str(info.value) and good not in str(info.value)

    unknown = _lora_file(tmp_path / "loha.safetensors", {f"{good}.hada_w1_a": (8, 2), f"{good}.lora_down.weight": (2, 8),
                                                          f"{good}.lora_up.weight": (8, 2)})
    with pytest.raises(LoraFormatError, match=f"{good}.hada_w1_a"):
        import_lora(unknown, out, base_model=tiny_pipeline_path)

    with_te = _lora_file(tmp_path / "te.safetensors", {
        f"{good}.lora_down.weight": (2, 8), f"{good}.lora_up.weight": (8, 2),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (2, 32)})
    with pytest.raises(LoraFormatError, match="text-encoder") as info:
        import_lora(with_te, out, base_model=tiny_pipeline_path)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in str(info.value)

    shape = _lora_file(tmp_path / "shape.safetensors", {f"unet.{TO_Q}.lora_A.weight": (2, 9),
                                                         f"unet.{TO_Q}.lora_B.weight": (8, 2)})
    with pytest.raises(LoraFormatError, match=r"the base model's is \[8, 8\]"):
        import_lora(shape, out, base_model=tiny_pipeline_path)

    pickled = tmp_path / "lora.ckpt"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(LoraFormatError, match="only in the safetensors format"):
        import_lora(pickled, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lora-import-")]


def test_cli_import_and_export(tiny_pipeline_path, tmp_path, capsys):
    from styleinject.cli import main

    folder = _random_adapter(tiny_pipeline_path, tmp_path / "ours", StyleInjectConfig.lora(rank=4))
    kohya = tmp_path / "k.safetensors"
    assert main(["adapter", "export", str(folder), str(kohya), "--format", "kohya"]) == 0
    assert main(["adapter", "import", str(kohya), "--out", str(tmp_path / "back"),
                 "--base-model", str(tiny_pipeline_path)]) == 0
    assert read_tensors(tmp_path / "back" / "adapter_model.safetensors")[0] == read_tensors(
        folder / "adapter_model.safetensors")[0]
    dma = _random_adapter(tiny_pipeline_path, tmp_path / "dma", StyleInjectConfig(rank=4, num_styles=2))
    capsys.readouterr()
    assert main(["adapter", "export", str(dma), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("styleinject adapter: error: ") and str(dma) in err and "load_adapter" in err


def test_the_api_converts_without_torch(tiny_pipeline_path, tmp_path):
    """The API image has no torch: its import route's conversion and the export must not need it."""
    import subprocess
    import sys

    from tests.service.conftest import REPO

    folder = _random_adapter(tiny_pipeline_path, tmp_path / "ours", StyleInjectConfig(**LORA_CFG))
    kohya = export_lora(folder, tmp_path / "k.safetensors", format="kohya")
    code = f"""
import sys
from pathlib import Path
from api.routes.adapters import convert_lora
from styleinject.interop import export_lora
config, meta, size = convert_lora(Path({str(kohya)!r}), "k.safetensors", Path({str(tmp_path / 'api')!r}),
                                  {str(tiny_pipeline_path)!r}, "tiny")
assert config["rank_pattern"] and meta["lora_format"] == "kohya" and len(meta["sha256"]) == 64, meta
export_lora({str(tmp_path / 'api')!r}, {str(tmp_path / 'd.safetensors')!r}, format="diffusers")
bad = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
    assert read_tensors(tmp_path / "api" / "adapter_model.safetensors")[0] == read_tensors(
        folder / "adapter_model.safetensors")[0]


def test_alpha_zero_means_rank_and_the_older_diffusers_keys(tiny_pipeline_path, tmp_path):
    kohya = "lora_unet_" + TO_Q.replace(".", "_")
    tensors = {k: RawTensor("F16", s, np.ones(s, "<f2").tobytes())
               for k, s in ((f"{kohya}.lora_down.weight", (2, 8)), (f"{kohya}.lora_up.weight", (8, 2)))}
    write_tensors(tmp_path / "k.safetensors", {**tensors, f"{kohya}.alpha": RawTensor.from_float(0.0)})
    cfg = StyleInjectConfig.load(import_lora(tmp_path / "k.safetensors", tmp_path / "k", base_model=tiny_pipeline_path))
    assert cfg.rank_alpha(TO_Q, conv=False) == (2, 2.0)  # kohya's scripts and A1111: alpha 0 = rank

    old = {f"unet.{TO_Q}.lora.down.weight": tensors[f"{kohya}.lora_down.weight"],
           f"unet.{TO_Q}.lora.up.weight": tensors[f"{kohya}.lora_up.weight"],
           f"unet.{TO_Q}.alpha": RawTensor.from_float(0.5)}
    write_tensors(tmp_path / "old.safetensors", old)
    folder = import_lora(tmp_path / "old.safetensors", tmp_path / "old", base_model=tiny_pipeline_path)
    assert StyleInjectConfig.load(folder).rank_alpha(TO_Q, conv=False) == (2, 0.5)
    weights = read_tensors(folder / "adapter_model.safetensors")[0]
    assert weights[f"{TO_Q}.si_A"].dtype == "F16" and weights[f"{TO_Q}.si_A"].shape == (1, 2, 8)  # kept fp16


def test_imported_peft_lora_equals_peft_in_float64(tiny_pipeline_path, tmp_path, unet_inputs):
    """Per-module ranks and alphas (rank_pattern / alpha_pattern) survive import exactly: the UNet with
    the imported adapter equals PEFT's UNet with the same LoRA, in float64."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from styleinject import load_adapter

    theirs = _unet(tiny_pipeline_path).double().eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "conv2"], init_lora_weights=False,
                        rank_pattern={TO_Q: 2, "conv2": 3}, alpha_pattern={"to_v": 3})
    theirs.add_adapter(config)
    metadata = {"r": 4, "lora_alpha": 8, "rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern,
                "target_modules": sorted(config.target_modules)}
    StableDiffusionPipeline.save_lora_weights(tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(theirs),
                                              unet_lora_adapter_metadata=metadata)
    folder = import_lora(tmp_path / "peft" / "pytorch_lora_weights.safetensors", tmp_path / "ours",
                         base_model=tiny_pipeline_path)
    ours = load_adapter(_unet(tiny_pipeline_path).double().eval(), folder)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in unet_inputs.items()}
    with torch.no_grad():
        want, got = theirs(**inputs).sample, ours(**inputs).sample
        base = _unet(tiny_pipeline_path).double().eval()(**inputs).sample
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _ldm_layout_file(path, folder, out):
    """The adapter as kohya writes SDXL LoRAs: flat original-layout (LDM) names. The names come from
    ``testing._ldm_unet``, the writer of our single-file checkpoints that diffusers' own
    ``from_single_file`` reads back (tests/test_single_file.py), not from the importer's mapping."""
    from styleinject.testing import _ldm_unet

    unet = _unet(path)
    ldm = _ldm_unet({k: k for k in unet.state_dict()}, unet.config)
    flat = {d.removesuffix(".weight").replace(".", "_"): o.removeprefix("model.diffusion_model.").removesuffix(".weight")
            .replace(".", "_") for o, d in ldm.items() if d.endswith(".weight")}
    tensors, metadata = read_tensors(export_lora(folder, out.with_suffix(".diffusers-names.safetensors"), format="kohya"))
    renamed = {}
    for key, tensor in tensors.items():
        stem, _, part = key.removeprefix("lora_unet_").partition(".")
        renamed[f"lora_unet_{flat[stem]}.{part}"] = tensor
    write_tensors(out, renamed, metadata)
    return out, {k.partition(".")[0] for k in renamed}


LDM_LAYOUT_CFG = dict(rank=2, alpha=2, num_styles=1, dma=False, sta=False, style_modules=[],
                      target_modules=["to_q", "to_v", "proj_in", "ff.net.2", "time_emb_proj"],
                      conv_target_modules=["conv1", "conv2", "conv_shortcut", "conv"], conv_rank=2)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_kohya_original_layout_names_import_as_the_same_adapter(kind, tiny_pipeline_path, tiny_sdxl_path, tmp_path):
    path = tiny_sdxl_path if kind == "sdxl" else tiny_pipeline_path  # 2 and 1 layers per block
    folder = _random_adapter(path, tmp_path / "ours", StyleInjectConfig(**LDM_LAYOUT_CFG))
    lora, stems = _ldm_layout_file(path, folder, tmp_path / "ldm.safetensors")
    # every kind of block: resnet convs and embedding projection, skip convs, down/up samplers, attention
    for part in ("input_blocks_1_0_in_layers_2", "_0_op", "_out_layers_3", "_emb_layers_1", "_skip_connection",
                 "middle_block_1_transformer_blocks_0_attn1_to_q", "middle_block_2_in_layers_2", "_2_conv",
                 "output_blocks_0_1_transformer_blocks_0_ff_net_2"):
        assert any(part in s for s in stems), part
    want = read_tensors(folder / "adapter_model.safetensors")[0]
    got = import_lora(lora, tmp_path / "imported", base_model=path)
    assert read_tensors(got / "adapter_model.safetensors")[0] == want
    assert StyleInjectConfig.load(got).rank == 2
    if kind == "sdxl":  # SDXL's own 2 layers per block: the base model is not needed to rename
        blind = import_lora(lora, tmp_path / "blind")
        assert read_tensors(blind / "adapter_model.safetensors")[0] == want


def test_kohya_sdxl_original_layout_file_equals_diffusers_reading_it(tiny_sdxl_path, tmp_path):
    """diffusers' load_lora_weights reads kohya's SDXL (original-layout) files itself: same UNet output."""
    from diffusers import StableDiffusionXLPipeline

    from styleinject import load_adapter

    folder = _random_adapter(tiny_sdxl_path, tmp_path / "ours", StyleInjectConfig(**LDM_LAYOUT_CFG))
    lora, _ = _ldm_layout_file(tiny_sdxl_path, folder, tmp_path / "ldm.safetensors")
    ref = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))
    ref.load_lora_weights(str(lora))
    ours = load_adapter(_unet(tiny_sdxl_path), import_lora(lora, tmp_path / "imported", base_model=tiny_sdxl_path))
    torch.manual_seed(1)
    args = (torch.randn(2, 4, 32, 32), torch.tensor([10, 500]), torch.randn(2, 7, 80))
    cond = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}}
    with torch.no_grad():
        want, got, base = (m(*args, **cond).sample for m in (ref.unet, ours, _unet(tiny_sdxl_path)))
    assert (got - base).abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_original_layout_name_that_is_no_lora_target_is_listed(tiny_pipeline_path, tmp_path):
    tensors = {"lora_unet_input_blocks_1_0_in_layers_0.lora_down.weight": RawTensor.from_float(1.0).reshaped((1, 1)),
               "lora_unet_input_blocks_1_0_in_layers_0.lora_up.weight": RawTensor.from_float(1.0).reshaped((1, 1))}
    write_tensors(tmp_path / "norm.safetensors", tensors)
    with pytest.raises(LoraFormatError, match="lora_unet_input_blocks_1_0_in_layers_0"):
        import_lora(tmp_path / "norm.safetensors", tmp_path / "out", base_model=tiny_pipeline_path)
    assert not (tmp_path / "out").exists()
