"""CLIPScore and PickScore on tiny random CLIPs, checked against CLIPModel.forward directly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from styleinject.eval.scorers import (
    CLIPScorer,
    PickScorer,
    ScorerLoadError,
    get_scorer,
    load_image_processor,
)
from tests.eval.helpers import random_images

PROMPTS = ["a red fox in snow", "a bowl of ramen", "an old lighthouse at dusk", "geometric tiles", "a dragon"]


def reference_cosines(model_dir, processor_dir, images, texts) -> torch.Tensor:
    """Cosine of each (image, text) pair from CLIPModel.forward's logits, one pair at a time."""
    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(processor_dir)
    processor = load_image_processor(str(processor_dir))
    out = []
    with torch.no_grad():
        for image, text in zip(images, texts):
            ids = tokenizer([text], return_tensors="pt")
            pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
            logits = model(input_ids=ids["input_ids"], pixel_values=pixels).logits_per_image[0, 0]
            out.append(logits / model.logit_scale.exp())
    return torch.stack(out)


def test_nothing_is_loaded_before_first_use(tmp_path):
    scorer = CLIPScorer(str(tmp_path / "does-not-exist"), device="cpu")
    assert not scorer.loaded  # building a scorer touches no file
    with pytest.raises(ScorerLoadError, match="clip_model"):
        scorer.score(random_images(1), ["x"])


def test_clipscore_matches_paper_formula(tiny_clip_dir):
    images = random_images(5)
    scorer = CLIPScorer(str(tiny_clip_dir), device="cpu", batch_size=2)
    scores = torch.tensor(scorer.score(images, PROMPTS))
    assert scores.shape == (5,)
    cos = reference_cosines(tiny_clip_dir, tiny_clip_dir, images, ["A photo depicts " + p for p in PROMPTS])
    expected = 100 * 2.5 * cos.clamp(min=0)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert ((scores >= 0) & (scores <= 250)).all()


def test_clipscore_clamps_each_sample_at_zero(tiny_clip_dir, tiny_clip_negated_dir):
    # The negated model gives exactly -cos for every pair, so for each pair one of the two scores
    # is clamped to 0 and the other is not; their difference recovers 250 * cos with its sign.
    images = random_images(5, seed=3)
    pos = torch.tensor(CLIPScorer(str(tiny_clip_dir), device="cpu").score(images, PROMPTS))
    neg = torch.tensor(CLIPScorer(str(tiny_clip_negated_dir), device="cpu").score(images, PROMPTS))
    cos = reference_cosines(tiny_clip_dir, tiny_clip_dir, images, ["A photo depicts " + p for p in PROMPTS])
    assert (cos.abs() > 1e-3).all()
    assert torch.all(torch.minimum(pos, neg) == 0)
    assert torch.all(torch.maximum(pos, neg) > 0)
    torch.testing.assert_close(pos - neg, 250 * cos, atol=1e-4, rtol=1e-4)


def test_clipscore_uses_the_prefix(tiny_clip_dir, tiny_clip_negated_dir):
    images = random_images(3)

    def signed(prefix):  # 2.5 * cos, sign included (see the clamp test)
        pos = CLIPScorer(str(tiny_clip_dir), device="cpu", scale=1.0, prefix=prefix).score(images, PROMPTS[:3])
        neg = CLIPScorer(str(tiny_clip_negated_dir), device="cpu", scale=1.0, prefix=prefix).score(images, PROMPTS[:3])
        return torch.tensor(pos) - torch.tensor(neg)

    cos = reference_cosines(tiny_clip_dir, tiny_clip_dir, images, ["A photo depicts " + p for p in PROMPTS[:3]])
    torch.testing.assert_close(signed("A photo depicts "), 2.5 * cos, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(signed(""), 2.5 * cos, atol=1e-3)


def test_pickscore_is_logit_minus_21(tiny_pickscore_dirs):
    model_dir, processor_dir = tiny_pickscore_dirs
    images = random_images(5, seed=1)
    scorer = PickScorer(str(model_dir), str(processor_dir), device="cpu", batch_size=3)
    scores = torch.tensor(scorer.score(images, PROMPTS))
    cos = reference_cosines(model_dir, processor_dir, images, PROMPTS)  # no prefix for PickScore
    logit_scale = CLIPModel.from_pretrained(model_dir).logit_scale.exp().item()
    torch.testing.assert_close(scores, logit_scale * cos - 21.0, atol=1e-4, rtol=1e-4)
    assert scorer.describe()["offset"] == 21.0


def test_pickscore_names_the_processor_flag(tiny_pickscore_dirs, tmp_path):
    model_dir, _ = tiny_pickscore_dirs
    scorer = PickScorer(str(model_dir), str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ScorerLoadError, match="pickscore_processor"):
        scorer.load()


def test_scores_are_deterministic_and_batch_independent(tiny_clip_dir):
    images = random_images(5, size=(64, 64), seed=7)
    one = CLIPScorer(str(tiny_clip_dir), device="cpu", batch_size=1).score(images, PROMPTS)
    five = CLIPScorer(str(tiny_clip_dir), device="cpu", batch_size=5)
    first, second = five.score(images, PROMPTS), five.score(images, PROMPTS)
    assert first == second
    torch.testing.assert_close(torch.tensor(one), torch.tensor(first), atol=1e-4, rtol=1e-5)


def test_single_prompt_and_paths(tiny_clip_dir, tmp_path):
    images = random_images(2)
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    scorer = CLIPScorer(str(tiny_clip_dir), device="cpu")
    assert scorer.score(paths, "a fox") == scorer.score(images, ["a fox", "a fox"])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        scorer.score(images, ["a", "b", "c"])


def test_get_scorer_by_name(tiny_clip_dir):
    assert isinstance(get_scorer("clipscore", str(tiny_clip_dir)), CLIPScorer)
    pick = get_scorer("PickScore")
    assert pick.model_path == "yuvalkirstain/PickScore_v1"
    assert pick.processor_path == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert CLIPScorer().model_path == "openai/clip-vit-base-patch32"
    with pytest.raises(ValueError, match="unknown scorer"):
        get_scorer("fid")
