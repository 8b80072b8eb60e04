"""Fixtures: tiny random CLIP scorer models in hub layout (no network, no real weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.eval.helpers import save_tiny_clip


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def tiny_clip_negated_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip-neg") / "tiny-clip-neg", seed=0, negate_image_projection=True)


@pytest.fixture(scope="session")
def tiny_pickscore_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(model, processor): separate folders like PickScore_v1 + LAION's CLIP-H processor."""
    root = tmp_path_factory.mktemp("pick")
    model = save_tiny_clip(root / "pickscore", seed=1)
    processor = save_tiny_clip(root / "processor", seed=2)
    for name in ("model.safetensors", "config.json"):  # the processor folder needs no weights
        (processor / name).unlink()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "preprocessor_config.json"):
        (model / name).unlink(missing_ok=True)
    return model, processor

