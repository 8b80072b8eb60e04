"""A tiny random checkpoint in the original ImageReward.pt layout, plus fixed inputs.

Only torch, numpy and PIL are imported, so the same file can be run next to the original
`image-reward` BLIP code to produce reference scores (REFERENCE_SCORES below, see test_imagereward).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

VISION_WIDTH, VISION_DEPTH, PATCH, IMAGE = 128, 2, 8, 32  # 2 heads of 64, like BLIP's ViTs
TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS, TEXT_FFN, TEXT_POSITIONS = 64, 2, 2, 96, 40
WORDS = "a the red fox in snow bowl of ramen old lighthouse at dusk dragon sleeping on gold cave photo".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), *"abcdefghijklmnopqrstuvwxyz"]
PROMPTS = ["a red fox in snow", "a bowl of ramen", "an old lighthouse at dusk",
           "a dragon sleeping on gold in a cave photo"]

# Computed once with the original ImageReward code (image-reward 1.5: BLIP med.py + vit.py on
# transformers 4.44.2, `ImageReward.score()`'s arithmetic) from save_tiny_imagereward()'s checkpoint
# and tiny_inputs(); see docs/evaluation.md.
REFERENCE_SCORES = [12.938365, 38.684963, 42.518261, 36.557407]


def _shapes() -> list[tuple[str, tuple[int, ...]]]:
    v, t, f = VISION_WIDTH, TEXT_WIDTH, TEXT_FFN
    keys: list[tuple[str, tuple[int, ...]]] = [
        ("blip.visual_encoder.cls_token", (1, 1, v)),
        ("blip.visual_encoder.pos_embed", (1, (IMAGE // PATCH) ** 2 + 1, v)),
        ("blip.visual_encoder.patch_embed.proj.weight", (v, 3, PATCH, PATCH)),
        ("blip.visual_encoder.patch_embed.proj.bias", (v,)),
    ]
    for i in range(VISION_DEPTH):
        p = f"blip.visual_encoder.blocks.{i}."
        keys += [(p + "norm1.weight", (v,)), (p + "norm1.bias", (v,)), (p + "attn.qkv.weight", (3 * v, v)),
                 (p + "attn.qkv.bias", (3 * v,)), (p + "attn.proj.weight", (v, v)), (p + "attn.proj.bias", (v,)),
                 (p + "norm2.weight", (v,)), (p + "norm2.bias", (v,)), (p + "mlp.fc1.weight", (4 * v, v)),
                 (p + "mlp.fc1.bias", (4 * v,)), (p + "mlp.fc2.weight", (v, 4 * v)), (p + "mlp.fc2.bias", (v,))]
    keys += [("blip.visual_encoder.norm.weight", (v,)), ("blip.visual_encoder.norm.bias", (v,))]
    p = "blip.text_encoder.embeddings."
    keys += [(p + "word_embeddings.weight", (len(VOCAB) + 2, t)),
             (p + "position_embeddings.weight", (TEXT_POSITIONS, t)),
             (p + "LayerNorm.weight", (t,)), (p + "LayerNorm.bias", (t,))]
    for i in range(TEXT_LAYERS):
        for block, kv_width in (("attention", t), ("crossattention", v)):
            p = f"blip.text_encoder.encoder.layer.{i}.{block}."
            keys += [(p + "self.query.weight", (t, t)), (p + "self.query.bias", (t,)),
                     (p + "self.key.weight", (t, kv_width)), (p + "self.key.bias", (t,)),
                     (p + "self.value.weight", (t, kv_width)), (p + "self.value.bias", (t,)),
                     (p + "output.dense.weight", (t, t)), (p + "output.dense.bias", (t,)),
                     (p + "output.LayerNorm.weight", (t,)), (p + "output.LayerNorm.bias", (t,))]
        p = f"blip.text_encoder.encoder.layer.{i}."
        keys += [(p + "intermediate.dense.weight", (f, t)), (p + "intermediate.dense.bias", (f,)),
                 (p + "output.dense.weight", (t, f)), (p + "output.dense.bias", (t,)),
                 (p + "output.LayerNorm.weight", (t,)), (p + "output.LayerNorm.bias", (t,))]
    widths = [t, 1024, 128, 64, 16, 1]
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        keys += [(f"mlp.layers.{index}.weight", (n_out, n_in)), (f"mlp.layers.{index}.bias", (n_out,))]
    # in the real checkpoint too, unused by scoring: BLIP_Pretrain's contrastive projections
    keys += [("blip.vision_proj.weight", (256, v)), ("blip.vision_proj.bias", (256,)),
             ("blip.text_proj.weight", (256, t)), ("blip.text_proj.bias", (256,))]
    return keys


def tiny_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in _shapes():
        value = torch.randn(shape, generator=generator) * (0.2 if key.startswith("mlp.") else 0.3)
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or "LayerNorm.weight" in key \
                or key == "blip.visual_encoder.norm.weight":
            value += 1.0
        state[key] = value
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(TEXT_POSITIONS)[None]
    return state


def save_tiny_imagereward(path: Path) -> Path:
    """`path/ImageReward.pt`, `path/med_config.json` and a BERT tokenizer in `path/bert`."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_state_dict(), path / "ImageReward.pt")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": TEXT_WIDTH, "initializer_range": 0.02,
           "intermediate_size": TEXT_FFN, "layer_norm_eps": 1e-12, "max_position_embeddings": TEXT_POSITIONS,
           "model_type": "bert", "num_attention_heads": TEXT_HEADS, "num_hidden_layers": TEXT_LAYERS,
           "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(VOCAB) + 2, "encoder_width": TEXT_WIDTH,
           "add_cross_attention": True}
    (path / "med_config.json").write_text(json.dumps(med, indent=2))
    (path / "bert").mkdir(exist_ok=True)
    (path / "bert" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (path / "bert" / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 512}))
    return path


def tiny_inputs() -> tuple[list[str], list[Image.Image]]:
    """Prompts and IMAGExIMAGE images (already at the model's size: the resize is the identity)."""
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(IMAGE, IMAGE, 3) * 255).astype("uint8")) for _ in PROMPTS]
    return list(PROMPTS), images
