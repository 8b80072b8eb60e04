"""The toystyle scorer: the packaged toy attribute checker reads the style an adapter adds."""

from __future__ import annotations

import pytest

from styleinject.eval.scorers import ScorerLoadError, ToyStyleScorer, get_scorer
from styleinject.eval.toyworld.render import render, scene_at
from styleinject.eval.toyworld.styles import STYLES, apply_style


def test_plain_scenes_score_near_0_and_styled_near_1():
    scorer = get_scorer("toystyle", device="cpu")  # the packaged checker: no path needed
    assert isinstance(scorer, ToyStyleScorer)
    scenes = [render(scene_at(11, i)) for i in range(12)]
    plain = scorer.score(scenes, "ignored")
    assert max(plain) < 0.05
    for style in STYLES:
        styled = scorer.score([apply_style(image, style) for image in scenes], "ignored")
        assert min(styled) > 0.9, style
    assert scorer.score(scenes, "ignored") == plain  # deterministic


def test_missing_checker_names_the_files(tmp_path):
    with pytest.raises(ScorerLoadError, match="checker.safetensors and checker_config.json"):
        ToyStyleScorer(str(tmp_path), device="cpu").load()
