"""Toy world models on a tiny budget: checker beats chance, base model and CLIP save in the
formats the pipeline and the CLIPScore scorer load, alignment report end to end."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert set(report["summary"]) == {"shape", "colour", "count", "all", "style", "style_dist", "clipscore"}
    assert report["summary"]["shape"]["n"] == 2 and (tmp_path / "run" / "grid.png").exists()


def test_experiment_runs_end_to_end(tmp_path, tiny_base, tiny_checker, tiny_clip):
    from styleinject.eval.toyworld.experiments import main

    main(["equal-params", "--model", str(tiny_base), "--checker", str(tiny_checker[1]), "--clip", str(tiny_clip),
          "--seeds", "0", "--steps", "1", "--n-eval", "2", "--batch-size", "2", "--root", str(tmp_path)])
    results = json.loads((tmp_path / "equal-params-stripes" / "results.json").read_text())
    table = results["table"]
    assert len(table) == 4 and len(results["rows"]) == 4
    lora_eq = table["lora, params = styleinject"]["params"]
    paper = table["styleinject r32 n16 (paper)"]["params"]
    assert abs(lora_eq - paper) / paper < 0.05
    assert table["lora r512 (paper's LoRA)"]["params"] == 16 * table["lora r32 (paper rank)"]["params"]
    md = (tmp_path / "equal-params-stripes" / "table.md").read_text()
    assert "| base model, no adapter |" in md and "Paired differences against **styleinject r32 n16" in md
    # every trained adapter's mechanism shares: LoRA has no router or STA, the paper's StyleInject has both
    assert "Mechanism shares" in md
    shares = {r["variant"]: r["shares"]["shares"] for r in results["rows"]}
    assert shares["lora r32 (paper rank)"]["router"] is None and shares["lora r32 (paper rank)"]["sta"] is None
    assert shares["styleinject r32 n16 (paper)"]["router"] is not None

    # the ablation shares the paper's StyleInject run through the cache instead of training it again
    logs = []
    from styleinject.eval.toyworld.experiments import run

    again = run("ablation", model=str(tiny_base), checker=str(tiny_checker[1]), clip=str(tiny_clip), style="stripes",
                seeds=[0], steps=1, lr=1e-3, batch_size=2, n_eval=2, root=tmp_path, log=logs.append)
    assert any(line.startswith("cached: DMA+STA seed 0") for line in logs), logs
    assert again["rows"][0]["run"] == results["rows"][0]["run"]
    assert again["rows"][0]["all"] == results["rows"][0]["all"]


def test_paired_differences_subtract_the_reference_seed_by_seed():
    from styleinject.eval.toyworld.experiments import paired_differences

    def row(variant, seed, v):
        return {"variant": variant, "seed": seed, "style": v, "style_dist": -v, "all": v, "clipscore": 10 * v}

    # a seed effect of +-0.3 shared by both variants, and a constant +0.1 difference
    rows = [row("ref", s, 0.3 * (s - 1)) for s in range(3)] + [row("b", s, 0.3 * (s - 1) + 0.1) for s in range(3)]
    rows.append(row("only seed 0", 0, 0.5))
    d = paired_differences(rows)
    assert set(d) == {"b", "only seed 0"}
    assert d["b"]["style"]["mean"] == pytest.approx(0.1) and d["b"]["style"]["ci95"] == pytest.approx(0, abs=1e-12)
    assert d["b"]["style_dist"]["mean"] == pytest.approx(-0.1) and d["b"]["clipscore"]["mean"] == pytest.approx(1.0)
    assert d["only seed 0"]["all"]["n"] == 1 and d["only seed 0"]["all"]["mean"] == pytest.approx(0.8)
    assert paired_differences(rows[:3]) == {}


def test_table_reprints_a_saved_results_file_and_rejects_other_files(tmp_path, capsys):
    from styleinject.eval.toyworld.experiments import main

    saved = Path(__file__).parents[3] / "docs" / "results" / "equal-params-stripes-convs.json"
    main(["table", str(saved)])
    out = capsys.readouterr().out
    assert "| lora r512 + convs (paper's LoRA) | 6,045,696 |" in out and "Paired differences" in out
    # results written before style_dist existed still print, with those cells empty
    old = json.loads(saved.read_text())
    for entry in [*old["rows"], *old["table"].values(), old["base_model_no_adapter"]]:
        entry.pop("style_dist")
    (tmp_path / "old.json").write_text(json.dumps(old))
    main(["table", str(tmp_path / "old.json")])
    assert "| lora r512 + convs (paper's LoRA) | 6,045,696 | 0.490 ± 0.137 |  |" in capsys.readouterr().out
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        main(["table", str(bad)])
    assert "is not an experiment's results.json" in capsys.readouterr().err


def test_long_experiment_scores_checkpoints_over_training(tmp_path, tiny_base, tiny_checker, tiny_clip):
    from styleinject.eval.toyworld.experiments import main

    main(["long", "--only", "paper)", "--convs", "--model", str(tiny_base), "--checker", str(tiny_checker[1]),
          "--clip", str(tiny_clip), "--seeds", "0", "1", "--steps", "2", "--curve-every", "1", "--n-eval", "2",
          "--batch-size", "2", "--root", str(tmp_path)])
    out = tmp_path / "long-stripes-convs"
    results = json.loads((out / "results.json").read_text())
    (name, entry), = results["table"].items()
    assert name == "styleinject r32 n16 + convs (paper)" and results["convs"]
    assert [point["step"] for point in entry["curve"]] == [1, 2]
    assert entry["curve"][0]["all"]["n"] == 2  # one value per seed at each step
    assert (out / "curve.png").is_file() and (out / "curve-style.png").is_file()
    assert "Over training" in (out / "table.md").read_text()


def test_style_distance_is_zero_on_the_styled_reference_and_grows_without_the_style():
    from styleinject.eval.toyworld.alignment import style_distance
    from styleinject.eval.toyworld.render import render, scene_at
    from styleinject.eval.toyworld.styles import STYLES, apply_style

    plain = [render(scene_at(0, i)) for i in range(8)]
    for style in STYLES:
        styled = [apply_style(im, style) for im in plain]
        assert style_distance(styled, styled) == 0.0
        assert style_distance(plain, styled) > 0.02, style


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


def test_the_shipped_demo_model_draws_what_the_prompt_asks_for():
    """The packaged toy base (the embedded service's demo model) with its own sampling defaults:
    the attribute checker reads the prompted shape and colour far above chance."""
    from pathlib import Path

    from styleinject.assets import TOY_BASE
    from styleinject.eval.toyworld.alignment import PROMPT_SEED
    from styleinject.eval.toyworld.checker import correct
    from styleinject.eval.toyworld.render import caption, scene_at
    from styleinject.pipeline import generate, load_pipeline

    pipe = load_pipeline(TOY_BASE, device="cpu")
    scenes = [scene_at(PROMPT_SEED, i) for i in range(24)]
    images = generate(pipe, [caption(s) for s in scenes], seed=0)  # 32 x 32, guidance 4, 30 steps
    assert images[0].size == (32, 32)
    checker = load_checker(Path(__file__).resolve().parents[3] / "models" / "toy-checker")
    right = correct(checker, images, scenes)
    # measured on 200 prompts x 3 seeds: shape 0.85, colour 0.82 (chance 0.33, 0.17)
    assert sum(right["shape"]) / 24 >= 0.6 and sum(right["colour"]) / 24 >= 0.5, right
