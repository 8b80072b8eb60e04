"""ImageReward (Xu et al., 2023), ported onto transformers' BLIP modules.

The `image-reward` PyPI package pins old timm/fairscale/transformers versions, so only what
scoring needs is ported here: the original checkpoint `ImageReward.pt` (BLIP ViT-L/16 image
encoder + BERT-base text encoder with cross-attention to the image + a 5-layer linear head) is
loaded, key by key, into `BlipVisionModel` + `BlipTextModel` + an identical head, and scored as
the reference `ImageReward.score()` does:

    reward = (head(BERT([CLS] prompt, cross-attending to ViT(image))[CLS]) - 0.16717362830052426)
             / 1.0333394966054072

Weights: a folder (or the hub repo `THUDM/ImageReward`) holding `ImageReward.pt` and
`med_config.json`; the tokenizer is `bert-base-uncased` plus the two BLIP special tokens.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from styleinject.eval.scorers.base import Scorer, ScorerLoadError, one_line

DEFAULT_IMAGEREWARD_MODEL = "THUDM/ImageReward"
DEFAULT_IMAGEREWARD_TOKENIZER = "bert-base-uncased"
CHECKPOINT_NAME = "ImageReward.pt"
MED_CONFIG_NAME = "med_config.json"
REWARD_MEAN = 0.16717362830052426  # ImageReward.py: normalisation of the raw head output
REWARD_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardHead(nn.Module):
    """The ImageReward MLP: five Linear layers with dropout between them and no activation
    (the reference code has its ReLUs commented out). Indices match the checkpoint's keys."""

    def __init__(self, width: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def split_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """ImageReward.pt keys -> (BlipVisionModel, BlipTextModel, RewardHead) state dicts."""
    vision, text, head = {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pattern, replacement in _VISION_RENAMES:
                name, count = re.subn(pattern, replacement, name)
                if count:
                    break
            vision[name] = value
        elif key.startswith("blip.text_encoder."):
            name = key[len("blip.text_encoder."):]
            if not name.endswith("position_ids"):  # a buffer, rebuilt by the module
                text[name] = value
        elif key.startswith("mlp."):
            head[key[len("mlp."):]] = value
    return vision, text, head


def build_models(state_dict: dict[str, torch.Tensor], med_config: dict[str, Any]):
    """BlipVisionModel, BlipTextModel and RewardHead shaped after the checkpoint, weights loaded."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision_sd, text_sd, head_sd = split_checkpoint(state_dict)
    if not vision_sd or not text_sd or not head_sd:
        raise ValueError("not an ImageReward checkpoint (expected blip.visual_encoder.*, blip.text_encoder.*, mlp.*)")
    width = vision_sd["embeddings.class_embedding"].shape[-1]
    patch = vision_sd["embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(vision_sd["embeddings.position_embedding"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[2]) for k in vision_sd if k.startswith("encoder.layers."))
    vision_config = BlipVisionConfig(
        hidden_size=width, intermediate_size=vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=max(1, width // 64),  # BLIP ViTs: 64-dim heads
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6,  # timm ViT eps
    )
    text_config = BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"], encoder_hidden_size=width,
        intermediate_size=med_config["intermediate_size"], num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"), layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=None, eos_token_id=None, sep_token_id=None,  # unused when scoring
        is_decoder=True,  # builds the cross-attention layers; forward runs with is_decoder=False
    )
    vision = BlipVisionModel(vision_config)
    text = BlipTextModel(text_config, add_pooling_layer=False)
    head = RewardHead(text_config.hidden_size)
    for module, sd in ((vision, vision_sd), (text, text_sd), (head, head_sd)):
        missing, unexpected = module.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"ImageReward checkpoint does not fit {type(module).__name__}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return vision.eval(), text.eval(), head.eval()


def preprocess(images: list, size: int) -> torch.Tensor:
    """The reference transform: Resize(size, bicubic) on the short side, CenterCrop(size), to
    [0, 1], normalise with CLIP's mean/std (torchvision's arithmetic, without torchvision)."""
    import numpy as np
    from PIL import Image

    out = []
    for image in images:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        image = image.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size)).convert("RGB")
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((array - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])
    return torch.stack(out)


def _resolve_file(source: Path | str, name: str) -> Path:
    """`name` inside a local folder, next to a local file, or downloaded from a hub repo id."""
    path = Path(source).expanduser()
    if path.is_file():
        path = path if path.name == name or name == CHECKPOINT_NAME else path.parent / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        return path
    if path.is_dir():
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found")
        return path / name
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(source), filename=name))


class ImageRewardScorer(Scorer):
    """ImageReward, the reference's normalised reward (roughly zero-mean, unit-sd on its data)."""

    name = "imagereward"

    def __init__(
        self,
        model: str | Path | None = DEFAULT_IMAGEREWARD_MODEL,
        *,
        tokenizer: str | Path = DEFAULT_IMAGEREWARD_TOKENIZER,
        max_length: int = 35,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_path = str(model) if model is not None else DEFAULT_IMAGEREWARD_MODEL
        self.tokenizer_path = str(tokenizer)
        self.max_length = max_length
        self.vision = self.text = self.head = self.tokenizer = None

    def _load(self) -> None:
        from transformers import AutoTokenizer

        try:
            checkpoint = _resolve_file(self.model_path, CHECKPOINT_NAME)
            med_config = json.loads(_resolve_file(self.model_path, MED_CONFIG_NAME).read_text())
            state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
            vision, text, head = build_models(state_dict, med_config)
        except Exception as error:  # noqa: BLE001 - every failure gets the same actionable message
            raise ScorerLoadError(
                "could not load ImageReward from {path!r}: {error_type}: {cause}. Pass {imagereward_model} with a "
                "folder holding {checkpoint} and {med_config} (on a machine with network, {hint} prints "
                "the folder it fetched)",
                path=self.model_path, error_type=type(error).__name__, cause=one_line(error),
                checkpoint=CHECKPOINT_NAME, med_config=MED_CONFIG_NAME,
                hint="`hf download THUDM/ImageReward ImageReward.pt med_config.json`",
            ) from error
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        except (OSError, ValueError) as error:
            raise ScorerLoadError(
                "could not load the ImageReward tokenizer from {path!r}: {cause}. Pass {imagereward_tokenizer} with "
                "a local copy of bert-base-uncased ({hint} prints the folder it fetched)",
                path=self.tokenizer_path, cause=one_line(error), hint="`hf download bert-base-uncased`",
            ) from error
        # BLIP's init_tokenizer: [DEC] as bos and [ENC] as an extra special token (ids 30522, 30523);
        # prompts never produce them, but the vocabulary size must match the embedding.
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        self.tokenizer = tokenizer
        self.vision = vision.to(self.device, self.dtype)
        self.text = text.to(self.device, self.dtype)
        self.head = head.to(self.device, torch.float32)

    def _score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        size = self.vision.config.image_size
        pixels = preprocess(images, size).to(self.device, self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = self.text(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, is_decoder=False,
        ).last_hidden_state
        reward = self.head(hidden[:, 0, :].float()).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_path,
            "tokenizer": self.tokenizer_path,
            "formula": f"(MLP(BLIP(image, prompt)[CLS]) - {REWARD_MEAN}) / {REWARD_STD}",
        }

    @classmethod
    def build(cls, model: str | None = None, processor: str | None = None, **kwargs: Any) -> ImageRewardScorer:
        """``processor``: the BERT tokenizer folder."""
        return cls(model, tokenizer=processor or DEFAULT_IMAGEREWARD_TOKENIZER, **kwargs)
