"""Builders for tiny random scorer models, saved and loaded back through the real from_pretrained path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from styleinject.testing import tiny_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def save_tiny_clip(path: Path, *, seed: int = 0, image_size: int = 32, negate_image_projection: bool = False) -> Path:
    """A tiny random CLIPModel + tokenizer + image processor folder (hub layout)."""
    from transformers import CLIPConfig, CLIPModel

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = len(tiny_tokenizer(path))  # byte-level CLIP tokenizer, one token per character
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    if negate_image_projection:  # flips the sign of every cosine: the same model "upside down"
        with torch.no_grad():
            model.visual_projection.weight.neg_()
    model.save_pretrained(path)
    preprocessor = {
        "crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": image_size,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return path


def random_images(n: int, size: tuple[int, int] = (48, 40), seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8")) for _ in range(n)]
