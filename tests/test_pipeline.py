import threading

import numpy as np
import pytest
import torch

from styleinject import StyleInjectConfig, adapter_parameters, disable_adapters, inject, save_adapter
from styleinject.adapters import active_adapter
from styleinject.adapters import load_adapter
from styleinject.pipeline import generate, load_pipeline
from styleinject.serving import engine_for

KW = dict(steps=2, width=64, height=64, guidance_scale=7.5)


def _px(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.fixture
def pipe(tiny_pipeline_path):
    return load_pipeline(tiny_pipeline_path, device="cpu")


def _adapter(path, tmp_path, name, seed):
    """A saved adapter with random non-zero weights on the tiny UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    inject(unet, StyleInjectConfig(rank=4, num_styles=2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return save_adapter(unet, tmp_path / name)


def _ours_and_diffusers(pipe, path, seed=42):
    """The same 2-image, 3-step request through our generate and through diffusers' own pipeline."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None)
    ref.scheduler = EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    want = ref("a red square", negative_prompt="blurry", num_inference_steps=3, width=64, height=64,
               guidance_scale=7.5, num_images_per_prompt=2, generator=torch.Generator().manual_seed(seed)).images
    got = generate(pipe, "a red square", negative_prompt="blurry", seed=seed, steps=3, width=64, height=64,
                   num_images=2)
    return got, want


def test_no_adapter_equals_diffusers_euler_ancestral(pipe, tiny_pipeline_path):
    got, want = _ours_and_diffusers(pipe, tiny_pipeline_path)
    assert len(got) == 2 and got[0].size == (64, 64)
    assert np.array_equal(_px(got), _px(want))
    other_seed = generate(pipe, "a red square", negative_prompt="blurry", seed=43, steps=3, width=64,
                          height=64, num_images=2)
    assert not np.array_equal(_px(other_seed), _px(want))


def test_v_prediction_model_equals_diffusers(tiny_sd2_path):
    """SD 2.x's v-prediction through our sampler (the serving engine's own Euler Ancestral step)."""
    pipe = load_pipeline(tiny_sd2_path, device="cpu")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    got, want = _ours_and_diffusers(pipe, tiny_sd2_path)
    assert np.array_equal(_px(got), _px(want))


def test_adapter_changes_image_and_disable_restores_it(pipe, tiny_pipeline_path, tmp_path):
    base = _px(generate(pipe, "a cat", **KW))
    folder = _adapter(tiny_pipeline_path, tmp_path, "ad", seed=0)
    styled = _px(generate(pipe, "a cat", adapter=folder, **KW))
    assert np.abs(styled - base).max() > 10
    assert np.array_equal(_px(generate(pipe, "a cat", **KW)), base)
    assert active_adapter(pipe.unet) is None  # folders run in serving slots: named adapters untouched
    # by name, then globally disabled
    load_adapter(pipe.unet, folder, "ad")  # diffusers' own pipeline call with the named adapter
    assert np.abs(_px(generate(pipe, "a cat", adapter="ad", **KW)) - styled).max() <= 1
    disable_adapters(pipe.unet)
    assert np.array_equal(_px(generate(pipe, "a cat", **KW)), base)
    half = _px(generate(pipe, "a cat", adapter=folder, adapter_scale=0.0, **KW))
    assert np.array_equal(half, base)


def test_swaps_in_place_and_caches(pipe, tiny_pipeline_path, tmp_path):
    one = _adapter(tiny_pipeline_path, tmp_path, "one", seed=1)
    two = _adapter(tiny_pipeline_path, tmp_path, "two", seed=2)
    engine = engine_for(pipe)
    img_one = _px(generate(pipe, "a dog", adapter=one, **KW))
    ptrs = [t.data_ptr() for t in [*pipe.unet.parameters(), *pipe.unet.buffers()]]
    img_two = _px(generate(pipe, "a dog", adapter=two, **KW))
    assert [t.data_ptr() for t in [*pipe.unet.parameters(), *pipe.unet.buffers()]] == ptrs  # no module rebuilt
    assert not np.array_equal(img_one, img_two)
    assert np.array_equal(_px(generate(pipe, "a dog", adapter=one, **KW)), img_one)
    assert engine.host.stats.misses == 2  # the third call came from host memory
    assert engine.table.stats.hits == 1  # ... and found its device slot still loaded


def test_concurrent_requests_never_mix_adapters(pipe, tiny_pipeline_path, tmp_path):
    folders = [_adapter(tiny_pipeline_path, tmp_path, f"a{i}", seed=10 + i) for i in range(2)]
    solo = [_px(generate(pipe, "a tree", adapter=f, **KW)) for f in folders]
    results = {}

    def worker(i, k):
        results[(i, k)] = _px(generate(pipe, "a tree", adapter=folders[i], **KW))

    threads = [threading.Thread(target=worker, args=(i, k)) for k in range(3) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (i, _), img in results.items():
        assert np.array_equal(img, solo[i])


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="multiple of 8"):
        generate(pipe, "x", width=60, height=64, steps=1)
    with pytest.raises(FileNotFoundError, match="neither a loaded adapter"):
        generate(pipe, "x", adapter="/no/such/adapter", steps=1, width=64, height=64)


def test_load_pipeline_rejects_non_pipeline_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path)


def test_tiny_pipeline_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from styleinject.testing import tiny_pipeline

    a, b = tiny_pipeline(tmp_path / "a"), tiny_pipeline(tmp_path / "b")
    for part in ("unet", "vae", "text_encoder"):
        fa = load_file(str(next((a / part).glob("*.safetensors"))))
        fb = load_file(str(next((b / part).glob("*.safetensors"))))
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert (a / "tokenizer" / "tokenizer.json").read_text() == (b / "tokenizer" / "tokenizer.json").read_text()


def test_mixed_batch_generation(pipe, tiny_pipeline_path, tmp_path):
    one = _adapter(tiny_pipeline_path, tmp_path, "m1", seed=21)
    two = _adapter(tiny_pipeline_path, tmp_path, "m2", seed=22)
    prompts = ["a cat", "a house"]
    mixed = _px(generate(pipe, prompts, adapter=[one, two], num_images=2, **KW))
    all_one = _px(generate(pipe, prompts, adapter=[one, one], num_images=2, **KW))
    all_two = _px(generate(pipe, prompts, adapter=two, num_images=2, **KW))
    base = _px(generate(pipe, prompts, adapter=[None, None], num_images=2, **KW))
    # samples never interact in the UNet, so each image depends only on its own adapter (up to
    # float summation order: the sub-batch matmuls have other shapes)
    assert np.abs(mixed[:2] - all_one[:2]).max() <= 2 and np.abs(mixed[2:] - all_two[2:]).max() <= 2
    assert not np.array_equal(all_one[2:], all_two[2:])
    assert np.array_equal(base, _px(generate(pipe, prompts, num_images=2, **KW)))
    with pytest.raises(ValueError, match="one per prompt"):
        generate(pipe, prompts, adapter=[one], **KW)


def test_unset_options_take_the_model_folders_generation_defaults(tiny_pipeline_path, tmp_path):
    import json
    import shutil

    from styleinject.pipeline import DEFAULTS_FILE, generation_defaults

    plain = load_pipeline(tiny_pipeline_path, device="cpu")
    # no defaults file: 30 steps, guidance 7.5, the native size (sample_size x VAE factor)
    native = plain.unet.config.sample_size * plain.vae_scale_factor
    assert generation_defaults(plain) == {"steps": 30, "guidance_scale": 7.5, "width": native, "height": native}

    folder = tmp_path / "model"
    shutil.copytree(tiny_pipeline_path, folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps({"steps": 2, "guidance_scale": 3.0, "width": 32, "height": 48}))
    pipe = load_pipeline(folder, device="cpu")
    got = generate(pipe, "a red square", seed=5)
    want = generate(plain, "a red square", seed=5, steps=2, guidance_scale=3.0, width=32, height=48)
    assert got[0].size == (32, 48)
    assert (_px(got) == _px(want)).all()
    # an explicit value still wins over the file
    assert generate(pipe, "a red square", seed=5, width=40, height=40)[0].size == (40, 40)


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('{"steps": "many"}', "steps must be a positive int"),
    ('{"steps": 2.5}', "steps must be a positive int"),
    ('{"guidance_scale": -1}', "guidance_scale must be a positive float"),
    ('{"sampler": "ddim"}', "expected an object with keys among"),
])
def test_a_bad_generation_defaults_file_is_named_in_the_error(tiny_pipeline_path, tmp_path, content, needle):
    import shutil

    from styleinject.pipeline import DEFAULTS_FILE

    folder = tmp_path / "model"
    shutil.copytree(tiny_pipeline_path, folder)
    (folder / DEFAULTS_FILE).write_text(content)
    with pytest.raises(ValueError, match=needle) as info:
        load_pipeline(folder, device="cpu")
    assert str(folder / DEFAULTS_FILE) in str(info.value)
