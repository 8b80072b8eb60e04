import pytest
import torch


@pytest.fixture(scope="session")
def tiny_pipeline_path(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline saved in diffusers format (once per session)."""
    from styleinject.testing import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory):
    """A tiny random SD 2.x-like pipeline (v-prediction, OpenCLIP-style text encoder)."""
    from styleinject.testing import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2") / "pipe", kind="sd2")


@pytest.fixture
def tiny_unet():
    from styleinject.testing import tiny_components

    return tiny_components()["unet"].eval()


@pytest.fixture
def unet_inputs():
    torch.manual_seed(1)
    return {"sample": torch.randn(2, 4, 32, 32), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 7, 32)}


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    """A tiny random SDXL pipeline saved in diffusers format (once per session)."""
    from styleinject.testing import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "pipe", kind="sdxl")
