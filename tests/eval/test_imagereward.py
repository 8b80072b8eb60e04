"""The ImageReward port against scores from the original ImageReward code on the same tiny weights."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from styleinject.eval.scorers import ScorerLoadError, get_scorer
from styleinject.eval.scorers.imagereward import ImageRewardScorer, preprocess, split_checkpoint
from tests.eval.tiny_imagereward import REFERENCE_SCORES, save_tiny_imagereward, tiny_inputs, tiny_state_dict


@pytest.fixture(scope="module")
def tiny_imagereward_dir(tmp_path_factory):
    return save_tiny_imagereward(tmp_path_factory.mktemp("imagereward"))


def test_matches_the_original_implementation(tiny_imagereward_dir):
    prompts, images = tiny_inputs()
    scorer = ImageRewardScorer(tiny_imagereward_dir, tokenizer=tiny_imagereward_dir / "bert", device="cpu",
                               batch_size=3)
    scores = scorer.score(images, prompts)
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(REFERENCE_SCORES), atol=1e-3, rtol=1e-5)
    assert scorer.score(images, prompts) == scores  # deterministic


def test_checkpoint_file_path_and_get_scorer(tiny_imagereward_dir):
    prompts, images = tiny_inputs()
    scorer = get_scorer("imagereward", str(tiny_imagereward_dir / "ImageReward.pt"),
                        str(tiny_imagereward_dir / "bert"), device="cpu")
    assert isinstance(scorer, ImageRewardScorer)
    torch.testing.assert_close(torch.tensor(scorer.score(images[:1], prompts[:1])),
                               torch.tensor(REFERENCE_SCORES[:1]), atol=1e-3, rtol=1e-5)


def test_checkpoint_key_mapping_ignores_unused_heads():
    vision, text, head = split_checkpoint(tiny_state_dict())
    assert "encoder.layers.1.self_attn.projection.weight" in vision
    assert "post_layernorm.bias" in vision and "embeddings.class_embedding" in vision
    assert "encoder.layer.0.crossattention.self.key.weight" in text
    assert not any("position_ids" in k for k in text)
    assert sorted(head) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert not any("proj" in k for k in text) and "vision_proj.weight" not in vision


def test_preprocess_resizes_short_side_then_center_crops():
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 8, 32))  # a blue band on the left edge is cropped away
    pixels = preprocess([wide], 16)
    assert pixels.shape == (1, 3, 16, 16)
    red = (1.0 - 0.48145466) / 0.26862954
    torch.testing.assert_close(pixels[0, 0], torch.full((16, 16), red), atol=1e-4, rtol=0)


def test_missing_weights_explain_what_to_pass(tmp_path):
    scorer = ImageRewardScorer(tmp_path, device="cpu")  # an empty folder
    with pytest.raises(ScorerLoadError, match="imagereward_model .*ImageReward.pt and med_config.json"):
        scorer.load()
