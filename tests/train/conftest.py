"""Training-test fixtures: tiny pipelines (student and teacher) and small TrainConfigs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def teacher_pipeline_path(tmp_path_factory):
    """Another tiny pipeline (other random weights, other text encoder): a distillation teacher."""
    from styleinject.testing import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("teacher") / "pipe", seed=1)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipeline_path):
    """The loaded student pipeline, shared by the generation checks."""
    from styleinject.pipeline import load_pipeline

    pipe = load_pipeline(tiny_pipeline_path, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def make_cfg(tiny_pipeline_path, tmp_path):
    """TrainConfig factory with test-sized defaults (64x64, rank 4, n 2, 2 sampling steps)."""
    from styleinject import StyleInjectConfig
    from styleinject.train import TrainConfig

    def make(kind="finetune", data=None, output="out", **kw):
        kw.setdefault("adapter", StyleInjectConfig(rank=4, num_styles=2))
        kw.setdefault("steps", 3)
        kw.setdefault("checkpoint_every", 0)
        kw.setdefault("resolution", 64)
        return TrainConfig(kind=kind, base_model=str(kw.pop("base_model", tiny_pipeline_path)), data=str(data),
                           output_dir=str(tmp_path / output), sample_steps=2, **kw)

    return make
