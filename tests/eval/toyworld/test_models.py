"""Toy world models on a tiny budget: checker beats chance, base model and CLIP save in the
formats the pipeline and the CLIPScore scorer load, alignment report end to end."""

from __future__ import annotations

import json

import pytest
import torch

from styleinject.eval.toyworld.checker import (
    CHANCE,
    TEST_SEED,
    accuracy,
    load_checker,
    make_split,
    predict,
    save_checker,
    train_checker,
)

EASY = {"count": 1, "size": "large", "background": "white"}


@pytest.fixture(scope="module")
def tiny_checker(tmp_path_factory):
    torch.set_num_threads(1)
    model = train_checker(n_train=200, steps=40, batch_size=32, styled=False, log=lambda _: None, **EASY)
    return model, save_checker(model, tmp_path_factory.mktemp("chk") / "checker")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from styleinject.eval.toyworld import base

    out = tmp_path_factory.mktemp("base") / "toy-base"
    base.main(["--out", str(out), "--steps", "2", "--vae-steps", "2", "--num-scenes", "32", "--batch-size", "4"])
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from styleinject.eval.toyworld.clip import main as train_clip

    out = tmp_path_factory.mktemp("clip") / "clip"
    train_clip(["--out", str(out), "--n-train", "40", "--steps", "2", "--batch-size", "8", "--n-test", "20"])
    return out


def test_checker_beats_chance_on_an_easy_split(tiny_checker):
    model, path = tiny_checker
    x, scenes, _ = make_split(60, TEST_SEED, styled=False, **EASY)
    acc = accuracy(model, x, scenes)
    assert acc["colour"] > CHANCE["colour"] + 0.3, acc
    again = load_checker(path)
    assert predict(again, x[:8]) == predict(model, x[:8])


def test_base_model_loads_as_a_pipeline(tiny_base):
    from styleinject.pipeline import generate, load_pipeline

    cfg = json.loads((tiny_base / "train_config.json").read_text())
    assert cfg["steps_done"] == 2 and cfg["final"] and "--steps 2" in cfg["reproduce"]
    pipe = load_pipeline(str(tiny_base), device="cpu")
    image = generate(pipe, "a red circle at the center on a white background", seed=0, steps=2,
                     width=32, height=32)[0]
    assert image.size == (32, 32)


def test_clip_loads_in_the_clipscore_scorer_and_alignment_report(tmp_path, tiny_base, tiny_checker, tiny_clip):
    from styleinject.eval.scorers import CLIPScorer
    from styleinject.eval.toyworld.alignment import evaluate_alignment
    from styleinject.eval.toyworld.render import caption, render, scene_at

    assert "swap_colour" in json.loads((tiny_clip / "clip_metrics.json").read_text())
    scores = CLIPScorer(model=str(tiny_clip), device="cpu").score(
        [render(scene_at(0, i)) for i in range(2)], [caption(scene_at(0, i)) for i in range(2)])
    assert len(scores) == 2 and all(0 <= s <= 250 for s in scores)
    report = evaluate_alignment(str(tiny_base), str(tiny_checker[1]), str(tiny_clip), n=3, seeds=(0, 1),
                                steps=2, out=tmp_path / "run")
    assert set(report["summary"]) == {"shape", "colour", "count", "all", "style", "clipscore"}
    assert report["summary"]["shape"]["n"] == 2 and (tmp_path / "run" / "grid.png").exists()


def test_experiment_runs_end_to_end(tmp_path, tiny_base, tiny_checker, tiny_clip):
    from styleinject.eval.toyworld.experiments import main

    main(["equal-params", "--model", str(tiny_base), "--checker", str(tiny_checker[1]), "--clip", str(tiny_clip),
          "--seeds", "0", "--steps", "1", "--n-eval", "2", "--batch-size", "2", "--root", str(tmp_path)])
    results = json.loads((tmp_path / "equal-params-stripes" / "results.json").read_text())
    table = results["table"]
    assert len(table) == 3 and len(results["rows"]) == 3
    lora_eq = table["lora, params = styleinject"]["params"]
    paper = table["styleinject r32 n16 (paper)"]["params"]
    assert abs(lora_eq - paper) / paper < 0.05
    assert "| base model, no adapter |" in (tmp_path / "equal-params-stripes" / "table.md").read_text()


def test_teacher_fine_tune_from_the_base_keeps_vae_and_text_encoder(tmp_path, tiny_base):
    from safetensors.torch import load_file

    from styleinject.eval.toyworld import base

    out = tmp_path / "teacher"
    base.main(["--init", str(tiny_base), "--style", "stripes", "--out", str(out), "--steps", "2",
               "--num-scenes", "8", "--batch-size", "4"])
    for sub, name in (("text_encoder", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
        a, b = load_file(str(tiny_base / sub / name)), load_file(str(out / sub / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(str(tiny_base / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert "--init" in json.loads((out / "train_config.json").read_text())["reproduce"]


def test_vae_only_then_base_with_that_vae(tmp_path):
    from safetensors.torch import load_file

    from styleinject.eval.toyworld import base

    base.main(["--vae-only", "--out", str(tmp_path / "vae"), "--vae-steps", "2", "--num-scenes", "16",
               "--batch-size", "4"])
    base.main(["--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "b"), "--steps", "1", "--num-scenes", "8",
               "--batch-size", "4"])
    a = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tmp_path / "b" / "vae"))
    assert vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.std.max() < 1e-5  # encoder returns its mean
    assert "--vae" in json.loads((tmp_path / "b" / "train_config.json").read_text())["reproduce"]


def test_distill_experiment_end_to_end(tmp_path, tiny_base, tiny_checker, tiny_clip):
    from styleinject.eval.toyworld.experiments import main

    main(["distill", "--model", str(tiny_base), "--teacher", str(tiny_base), "--checker", str(tiny_checker[1]),
          "--clip", str(tiny_clip), "--seeds", "0", "--steps", "1", "--n-eval", "2", "--batch-size", "2",
          "--root", str(tmp_path)])
    results = json.loads((tmp_path / "distill-stripes" / "results.json").read_text())
    assert len(results["rows"]) == 3 and results["teacher"] is not None
    assert "| teacher" in (tmp_path / "distill-stripes" / "table.md").read_text()
