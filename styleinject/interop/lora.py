"""LoRA files in and out: diffusers/PEFT and kohya (A1111, ComfyUI) formats <-> LoRA-mode adapters.

A LoRA-mode adapter (n = 1, no router, no STA) holds, per layer, ``si_A`` (1, r, in[, kh, kw]) and
``si_B`` (out, r) with scale alpha / r: exactly a LoRA's down (A) and up (B) weights. Conversion
renames keys and drops or adds axes of length 1; tensor bytes are copied as they are, so no dtype is
converted and nothing here needs torch (the API image imports this module).

Key layouts (``<m>`` = a UNet module name, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``):
  diffusers/PEFT  ``unet.<m>.lora_A.weight``, ``unet.<m>.lora_B.weight`` (prefix ``unet.``, none, or
                  PEFT's ``base_model.model.``; older diffusers: ``<m>.lora.down.weight`` /
                  ``.lora.up.weight`` / ``.alpha``). Alphas: the file's ``lora_adapter_metadata``
                  (a PEFT LoraConfig as JSON: ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``)
                  or, absent, alpha = rank (scale 1), as diffusers assumes.
  kohya           ``lora_unet_<m with '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
                  (absent or 0: alpha = rank, as kohya's scripts assume). Underscores are ambiguous
                  (``down_blocks_0`` is ``down_blocks.0``), so names are matched against the base
                  model's real module names when one is given, else split by diffusers' UNet naming.
                  kohya's SDXL files (and some SD 1.x ones) name modules in the original LDM layout
                  (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``output_blocks_2_0_in_layers_2``,
                  ``middle_block_1_proj_in``): these are renamed to diffusers' layout first, which
                  needs the UNet's layers per block (read from the base model; without one, 2, as in
                  SD 1.x, 2.x and SDXL).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from styleinject.adapters.config import ADAPTER_TYPE, CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, StyleInjectConfig
from styleinject.interop.tensorfile import FLOAT_DTYPES, RawTensor, TensorFileError, read_tensors, write_tensors

FORMATS = ("diffusers", "kohya")
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the LoraConfig JSON in the header
KOHYA_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.",
                         "text_encoder_2.", "text_encoder_3.", "te.", "te1.", "te2.")
_DIFFUSERS_PREFIXES = ("unet.", "base_model.model.")  # diffusers' save_lora_weights / PEFT save_pretrained
_DIFFUSERS_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                       ".lora.up.weight": "up", ".alpha": "alpha"}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
# diffusers UNet name parts that hold an underscore: how kohya's flat names are split without a model
_COMPOUND_PARTS = ("conv_norm_out", "add_time_proj", "encoder_hid_proj", "down_blocks", "up_blocks",
                   "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out",
                   "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding", "time_proj",
                   "linear_1", "linear_2", "add_embedding", "class_embedding")
_SHOWN = 20  # keys listed in one error message
# the original (LDM) layout's names, flat: how diffusers' modules were called in SD's own code
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)(?:_(.+))?$")
_LDM_MIDDLE = re.compile(r"^middle_block_(\d)_(.+)$")
_LDM_TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
            "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
            "out_2": "conv_out", "input_blocks_0_0": "conv_in"}
_LDM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}


class LoraFormatError(ValueError):
    """A LoRA file that cannot become an adapter (or an adapter that cannot become a LoRA file)."""


@dataclass
class _Module:
    down: RawTensor | None = None
    up: RawTensor | None = None
    alpha: float | None = None


# -- the base model's layers ------------------------------------------------------------------------

def module_inventory(base_model) -> dict[str, tuple[int, ...]]:
    """``{module name: weight shape}`` of the Linear (2-d) and Conv2d (4-d) layers of a UNet.

    ``base_model``: a loaded UNet (``nn.Module``; adapters already injected are looked through),
    or a local diffusers pipeline folder or its ``unet`` folder, read from the safetensors headers
    only (no torch, no weights loaded).
    """
    if hasattr(base_model, "named_modules"):
        from torch import nn

        shapes = {}
        for name, module in base_model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                shapes[name.removesuffix(".base_layer")] = tuple(module.weight.shape)
        return shapes
    folder = Path(str(base_model)).expanduser()
    if (folder / "unet").is_dir():
        folder = folder / "unet"
    # shards and dtype variants alike: variants repeat the same names and shapes
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) if folder.is_dir() else []
    if not files:
        raise LoraFormatError(f"{base_model}: no diffusers UNet weights (unet/diffusion_pytorch_model*.safetensors) "
                              "found; pass a local diffusers pipeline folder, or no base model")
    from safetensors import safe_open

    shapes = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():
                shape = tuple(handle.get_slice(key).get_shape())
                if key.endswith(".weight") and len(shape) in (2, 4):
                    shapes[key.removesuffix(".weight")] = shape
    return shapes


# -- in --------------------------------------------------------------------------------------------

def import_lora(file: str | Path, out_dir: str | Path, base_model=None, *,
                base_model_name: str | None = None) -> Path:
    """Convert a LoRA file (diffusers/PEFT or kohya format, safetensors) into a LoRA-mode adapter folder.

    ``base_model`` (a loaded UNet or a local diffusers folder, see ``module_inventory``) is what the
    names and shapes are checked against; without it, diffusers names are taken as they are and
    kohya names are split by diffusers' UNet naming, and the shapes are checked when the adapter is
    loaded. Text-encoder weights, unknown keys and modules the base model lacks raise
    ``LoraFormatError`` listing them: nothing is loaded partially and ``out_dir`` is written only
    on success. ``base_model_name`` is recorded in the adapter's metadata (default: ``base_model``
    when it is a path). Returns ``out_dir``, which ``styleinject.load_adapter`` loads.
    """
    file = Path(file)
    try:
        tensors, metadata = read_tensors(file)
    except TensorFileError as exc:
        raise LoraFormatError(str(exc)) from None
    inventory = module_inventory(base_model) if base_model is not None else None
    fmt, modules = _parse(file, tensors, metadata, inventory)
    cfg, weights = _to_adapter(file, modules, inventory)
    if base_model_name is None and isinstance(base_model, (str, Path)):
        base_model_name = str(Path(base_model).expanduser().resolve())
    header = {"format": "pt", "adapter_type": ADAPTER_TYPE, "styleinject_format_version": FORMAT_VERSION,
              "kind": "import", "lora_format": fmt, "source_file": file.name}
    if base_model_name:
        header["base_model"] = base_model_name
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lora-import-", dir=out_dir.parent))
    try:
        write_tensors(staging / WEIGHTS_NAME, weights, header)
        cfg.save(staging)
        out_dir.mkdir(exist_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _parse(file: Path, tensors: dict[str, RawTensor], metadata: dict[str, str],
           inventory: dict[str, tuple[int, ...]] | None) -> tuple[str, dict[str, _Module]]:
    """(format, {module name: down/up/alpha}) of a LoRA file; every key is accounted for or an error."""
    text_encoder = sorted(k for k in tensors if k.startswith(TEXT_ENCODER_PREFIXES))
    if text_encoder:
        raise LoraFormatError(
            f"{file} has {len(text_encoder)} text-encoder LoRA weights: {_listing(text_encoder)}. "
            "StyleInject adapters change the UNet only, and loading the UNet part alone would not be the "
            "LoRA its author made; use a UNet-only LoRA (e.g. one trained without text-encoder training)")
    if not tensors:
        raise LoraFormatError(f"{file} holds no tensors")
    kohya = any(k.startswith(KOHYA_PREFIX) for k in tensors)
    fmt = "kohya" if kohya else "diffusers"
    suffixes = _KOHYA_SUFFIXES if kohya else _DIFFUSERS_SUFFIXES
    grouped: dict[str, _Module] = {}
    unknown = []
    for key, tensor in tensors.items():
        stem, part = _split_key(key, suffixes, () if kohya else _DIFFUSERS_PREFIXES)
        if kohya and stem is not None:
            stem = stem.removeprefix(KOHYA_PREFIX) if stem.startswith(KOHYA_PREFIX) else None
        if stem is None or not stem:
            unknown.append(key)
            continue
        module = grouped.setdefault(stem, _Module())
        if part == "alpha":
            try:
                # 0 means "alpha = rank" to kohya's scripts and A1111 (None below), not "scale 0"
                module.alpha = tensor.scalar() or None
            except ValueError as exc:
                raise LoraFormatError(f"{file}: {key}: {exc}") from None
        else:
            setattr(module, part, tensor)
    if unknown:
        raise LoraFormatError(
            f"{file}: {len(unknown)} keys are not UNet LoRA weights of the {fmt} format: {_listing(unknown)}. "
            f"Accepted: {_accepted(fmt)}. Other kinds (LoHa, LoKr, DoRA, LoRA biases) cannot be imported")
    names = _resolve_names(file, fmt, sorted(grouped), inventory)
    modules = {names[stem]: module for stem, module in grouped.items()}
    if fmt == "diffusers":
        _diffusers_alphas(file, modules, metadata)
    return fmt, modules


def _split_key(key: str, suffixes: dict[str, str], prefixes: tuple[str, ...]) -> tuple[str | None, str | None]:
    for suffix, part in suffixes.items():
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            for prefix in prefixes:
                stem = stem.removeprefix(prefix)
            return stem, part
    return None, None


def _accepted(fmt: str) -> str:
    if fmt == "kohya":
        return "lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha"
    return "[unet.]<module>.lora_A.weight / .lora_B.weight (or .lora.down.weight / .lora.up.weight / .alpha)"


def _resolve_names(file: Path, fmt: str, stems: list[str],
                   inventory: dict[str, tuple[int, ...]] | None) -> dict[str, str]:
    """File stem -> the UNet's module name; stems that match no module are an error listing them."""
    if fmt == "kohya":
        per_block = _layers_per_block(inventory)
        flat_stems = {stem: _from_ldm_layout(stem, per_block) or stem for stem in stems}
        if inventory is None:
            return {stem: _split_kohya(flat_stems[stem]) for stem in stems}
        flat: dict[str, list[str]] = {}
        for name in inventory:
            flat.setdefault(name.replace(".", "_"), []).append(name)
        names, unmatched = {}, []
        for stem in stems:
            found = flat.get(flat_stems[stem], [])
            if len(found) != 1:
                unmatched.append(KOHYA_PREFIX + stem + ("" if not found else f" (ambiguous: {found})"))
            else:
                names[stem] = found[0]
    else:
        names = {stem: stem for stem in stems}
        unmatched = [stem for stem in stems if inventory is not None and stem not in inventory]
    if unmatched:
        examples = sorted(inventory or {})[:3]
        raise LoraFormatError(
            f"{file}: {len(unmatched)} LoRA modules match no Linear/Conv2d layer of the base model's UNet: "
            f"{_listing(unmatched)}. Its layers are named like {examples}: the file was made for another "
            "model (e.g. SDXL vs SD 1.5); import it against the base model it was trained on")
    return names


def _layers_per_block(inventory: dict[str, tuple[int, ...]] | None) -> int:
    """Resnets per down block of the base UNet (what the original layout's block numbers count)."""
    found = [int(m.group(1)) for name in inventory or {} if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", name))]
    return max(found) + 1 if found else 2


def _from_ldm_layout(stem: str, per_block: int) -> str | None:
    """A flat original-layout module name in diffusers' flat layout (``input_blocks_4_1_proj_in`` ->
    ``down_blocks_1_attentions_0_proj_in`` with 2 layers per block); None: not an original-layout name.

    Block numbering (as SD's ``openaimodel.py`` builds the UNet): input block 0 is ``conv_in``, then
    each down level holds ``per_block`` (resnet, attention) pairs and a downsampler (``op``); each up
    level holds ``per_block + 1`` (resnet, attention) pairs, the last one ending with the upsampler
    (``conv``); the middle block is resnet, attention, resnet."""
    if stem in _LDM_TOP:
        return _LDM_TOP[stem]
    per = per_block + 1
    if m := _LDM_MIDDLE.match(stem):
        index, rest = int(m.group(1)), m.group(2)
        if index == 1:
            return f"mid_block_attentions_0_{rest}"
        return f"mid_block_resnets_{index // 2}_{_LDM_RESNET[rest]}" if rest in _LDM_RESNET else None
    if not (m := _LDM_BLOCK.match(stem)) or m.group(4) is None:
        return None
    where, index, part, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if where == "input_blocks":
        level, layer = divmod(index - 1, per)
        if layer == per_block:
            return f"down_blocks_{level}_downsamplers_0_conv" if (part, rest) == (0, "op") else None
        block = "down_blocks"
    else:
        level, layer = divmod(index, per)
        if part > 0 and rest == "conv":
            return f"up_blocks_{level}_upsamplers_0_conv" if layer == per_block else None
        block = "up_blocks"
    if part == 0:
        return f"{block}_{level}_resnets_{layer}_{_LDM_RESNET[rest]}" if rest in _LDM_RESNET else None
    return f"{block}_{level}_attentions_{layer}_{rest}" if part == 1 else None


def _split_kohya(stem: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` -> dotted diffusers name."""
    tokens, parts, i = stem.split("_"), [], 0
    while i < len(tokens):
        for width in (3, 2):
            joined = "_".join(tokens[i:i + width])
            if len(tokens) - i >= width and joined in _COMPOUND_PARTS:
                parts.append(joined)
                i += width
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def _diffusers_alphas(file: Path, modules: dict[str, _Module], metadata: dict[str, str]) -> None:
    """Fill in alphas from diffusers' ``lora_adapter_metadata`` (a PEFT LoraConfig), matched as PEFT does."""
    raw = metadata.get(LORA_METADATA_KEY)
    if not raw:
        return
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"{file}: its {LORA_METADATA_KEY} metadata is not JSON ({exc})") from None
    if any(key.startswith("unet.") for key in config):
        config = {k.removeprefix("unet."): v for k, v in config.items() if k.startswith("unet.")}
    for flag in ("use_dora", "use_rslora", "lora_bias"):
        if config.get(flag):
            raise LoraFormatError(f"{file}: a LoRA with {flag}=true cannot be imported (its update is not "
                                  "scale * B A); export it from its tool as a plain LoRA")
    alpha_pattern = config.get("alpha_pattern") or {}
    default = config.get("lora_alpha")
    for name, module in modules.items():
        if module.alpha is not None:
            continue
        # PEFT's get_pattern_key: a pattern matches a module name it ends with after a '.'
        key = next((k for k in alpha_pattern if re.match(rf"(.*\.)?({k})$", name)), None)
        module.alpha = float(alpha_pattern[key]) if key is not None else (
            float(default) if default is not None else None)


def _to_adapter(file: Path, modules: dict[str, _Module], inventory: dict[str, tuple[int, ...]] | None
                ) -> tuple[StyleInjectConfig, dict[str, RawTensor]]:
    weights: dict[str, RawTensor] = {}
    linear: dict[str, tuple[int, float]] = {}
    conv: dict[str, tuple[int, float]] = {}
    problems = []
    for name in sorted(modules):
        module = modules[name]
        if module.down is None or module.up is None:
            problems.append(f"{name}: has {'an up' if module.down is None else 'a down'} weight but no "
                            f"{'down' if module.down is None else 'up'} weight")
            continue
        down, up = module.down, module.up
        if down.dtype not in FLOAT_DTYPES or up.dtype not in FLOAT_DTYPES:
            problems.append(f"{name}: weights are {down.dtype}/{up.dtype}, not floating point")
            continue
        if not (down.is_finite() and up.is_finite()):
            problems.append(f"{name}: holds NaN or Inf values")
            continue
        base = inventory.get(name) if inventory is not None else None
        is_conv = len(base) == 4 if base is not None else len(down.shape) == 4
        shapes = _lora_shapes(down.shape, up.shape, base, is_conv)
        if isinstance(shapes, str):
            problems.append(f"{name}: {shapes}")
            continue
        A_shape, B_shape = shapes
        rank = A_shape[1]
        alpha = float(rank) if module.alpha is None else module.alpha
        (conv if is_conv else linear)[name] = (rank, alpha)
        weights[f"{name}.si_A"] = down.reshaped(A_shape)
        weights[f"{name}.si_B"] = up.reshaped(B_shape)
    if problems:
        raise LoraFormatError(f"{file}: {len(problems)} LoRA modules cannot be imported: {_listing(problems)}")
    rank, alpha, rank_pattern, alpha_pattern = _defaults_and_patterns(linear)
    conv_rank, conv_alpha, conv_rank_pattern, conv_alpha_pattern = _defaults_and_patterns(conv)
    cfg = StyleInjectConfig(
        rank=rank or conv_rank, alpha=alpha if rank else conv_alpha, num_styles=1, dma=False, sta=False,
        target_modules=sorted(linear), style_modules=[], conv_target_modules=sorted(conv),
        conv_rank=conv_rank or rank, conv_alpha=conv_alpha if conv_rank else alpha,
        rank_pattern={**rank_pattern, **conv_rank_pattern}, alpha_pattern={**alpha_pattern, **conv_alpha_pattern})
    return cfg, weights


def _lora_shapes(down: tuple[int, ...], up: tuple[int, ...], base: tuple[int, ...] | None,
                 is_conv: bool) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """(si_A shape, si_B shape) for a LoRA's down/up shapes, or why they do not fit."""
    if len(down) not in (2, 4) or len(up) not in (2, 4) or (len(up) == 4 and tuple(up[2:]) != (1, 1)):
        return f"unsupported LoRA shapes down {list(down)}, up {list(up)}"
    rank, fan_in, out = down[0], down[1], up[0]
    kernel = tuple(down[2:]) if len(down) == 4 else (1, 1)
    if up[1] != rank:
        return f"down {list(down)} and up {list(up)} disagree on the rank"
    if is_conv:
        expected = (out, fan_in, *kernel)
        A_shape = (1, rank, fan_in, *kernel)
    else:
        if kernel != (1, 1):
            return f"a {kernel[0]}x{kernel[1]} convolution LoRA for a Linear layer"
        expected = (out, fan_in)
        A_shape = (1, rank, fan_in)
    if base is not None and tuple(base) != expected:
        return f"LoRA for a layer of shape {list(expected)}, the base model's is {list(base)}"
    return A_shape, (out, rank)


def _defaults_and_patterns(layers: dict[str, tuple[int, float]]):
    """The most common rank and alpha, and per-module patterns (exact names) for the others."""
    if not layers:
        return None, None, {}, {}
    rank = Counter(r for r, _ in layers.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in layers.values()).most_common(1)[0][0]
    return (rank, alpha, {n: r for n, (r, _) in layers.items() if r != rank},
            {n: a for n, (_, a) in layers.items() if a != alpha})


# -- out -------------------------------------------------------------------------------------------

def export_lora(adapter_dir: str | Path, out_file: str | Path, format: str = "diffusers") -> Path:  # noqa: A002
    """Write a LoRA-mode adapter folder as a LoRA file: ``"diffusers"`` (loads with diffusers'
    ``pipe.load_lora_weights``) or ``"kohya"`` (A1111, ComfyUI). An adapter with DMA or STA cannot
    be a LoRA file and raises ``LoraFormatError`` saying so. Returns ``out_file``."""
    if format not in FORMATS:
        raise LoraFormatError(f"format must be one of {', '.join(FORMATS)} (got {format!r})")
    adapter_dir = Path(adapter_dir)
    try:
        cfg = StyleInjectConfig.load(adapter_dir)
        tensors, _ = read_tensors(adapter_dir / WEIGHTS_NAME)
    except (FileNotFoundError, ValueError) as exc:
        raise LoraFormatError(f"{adapter_dir} is not an adapter folder: {exc}") from None
    layers = lora_layers(adapter_dir, cfg, tensors)
    if not layers:
        raise LoraFormatError(f"{adapter_dir}: the adapter has no layers")
    out: dict[str, RawTensor] = {}
    ranks, alphas = {}, {}
    for name, (A, B) in layers.items():
        conv = len(A.shape) == 5
        rank, alpha = cfg.rank_alpha(name, conv)
        if A.shape[1] != rank:
            raise LoraFormatError(f"{adapter_dir}: {name} has rank {A.shape[1]} in the weights and {rank} in "
                                  f"{CONFIG_NAME}; the folder is inconsistent: save it again")
        ranks[name], alphas[name] = rank, alpha
        down = A.reshaped(A.shape[1:])
        up = B.reshaped((*B.shape, 1, 1)) if conv else B
        if format == "kohya":
            stem = KOHYA_PREFIX + name.replace(".", "_")
            out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = down, up
            out[f"{stem}.alpha"] = RawTensor.from_float(alpha)
        else:
            out[f"unet.{name}.lora_A.weight"], out[f"unet.{name}.lora_B.weight"] = down, up
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    if format == "kohya":
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                    "ss_network_alpha": _number(alpha)}
    else:
        # diffusers (>= 0.34) builds its PEFT LoraConfig from this; without it, it would assume alpha = rank
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(layers),
                  "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
                  "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha}}
        metadata = {"format": "pt", LORA_METADATA_KEY: json.dumps(
            {f"unet.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    write_tensors(partial, out, metadata)
    partial.replace(out_file)
    return out_file


def lora_layers(adapter_dir: str | Path, cfg: StyleInjectConfig, tensors: dict[str, RawTensor]
                ) -> dict[str, tuple[RawTensor, RawTensor]]:
    """``{layer: (si_A, si_B)}`` of a LoRA-mode adapter; ``LoraFormatError`` for DMA/STA adapters."""
    layers: dict[str, dict[str, RawTensor]] = {}
    styled = set()
    for key, tensor in tensors.items():
        name, _, kind = key.rpartition(".")
        if kind in ("si_A", "si_B"):
            layers.setdefault(name, {})[kind] = tensor
            if kind == "si_A" and tensor.shape[0] > 1:
                styled.add(name)
        else:
            styled.add(name)
    if styled:
        parts = [p for p, on in (("DMA", cfg.dma and cfg.num_styles > 1), ("STA", cfg.sta)) if on] or ["a style router"]
        raise LoraFormatError(
            f"{adapter_dir} is a StyleInject adapter with {' and '.join(parts)} on {len(styled)} layers "
            f"({_listing(sorted(styled))}), not a LoRA: its style router and AdaIN rescaling depend on each "
            "input, so they cannot be written as (or merged into) a LoRA's fixed B A. Use the adapter folder "
            "itself, which loads with styleinject.load_adapter (or GET /adapters/{id}/download); only "
            "LoRA-mode adapters (StyleInjectConfig.lora, or imported LoRA files) export to LoRA formats")
    broken = sorted(n for n, kinds in layers.items() if set(kinds) != {"si_A", "si_B"})
    if broken:
        raise LoraFormatError(f"{adapter_dir}: layers without both si_A and si_B: {_listing(broken)}")
    return {n: (kinds["si_A"], kinds["si_B"]) for n, kinds in sorted(layers.items())}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
