"""The scorer registry, its names and the scorer errors as the API sees them."""

from __future__ import annotations

import pytest

from styleinject.errors import api_message
from styleinject.eval.cli import SCORER_CHOICES
from styleinject.eval.scorers import SCORERS, CLIPScorer, ImageRewardScorer, ScorerLoadError, get_scorer
from styleinject.names import SCORER_NAMES
from tests.eval.helpers import random_images


def test_registry_matches_the_names():
    assert tuple(SCORERS) == SCORER_NAMES == SCORER_CHOICES
    assert isinstance(get_scorer("CLIP-Score"), CLIPScorer)
    assert isinstance(get_scorer("imagereward"), ImageRewardScorer)


def test_scorer_load_error_names_the_field(tmp_path):
    scorer = CLIPScorer(str(tmp_path / "missing{x}"), device="cpu")
    with pytest.raises(ScorerLoadError) as info:
        scorer.score(random_images(1), ["x"])
    assert info.value.fields == ("clip_model",) and isinstance(info.value, RuntimeError)
    message = api_message(info.value)
    assert "--" not in message and "STYLEINJECT_SCORER_PATHS.clipscore" in message
    assert "missing{x}" in message
    assert "--clip-model" in info.value.render({"clip_model": "--clip-model"})
