"""evaluate_adapter end to end on the tiny pipeline, and the report statistics."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from PIL import Image

from styleinject.eval import evaluate_adapter
from styleinject.eval.prompts import Prompt
from styleinject.eval.runner import mean_ci, summarize, t_quantile_975
from styleinject.eval.scorers import CLIPScorer, PickScorer

PROMPTS = [Prompt("animals-00", "animals", "a red fox in snow"), Prompt("food-00", "food", "a bowl of ramen")]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_pipeline_path, tmp_path_factory):
    """A StyleInject adapter whose weights are random (not the identity init) so it changes images."""
    from diffusers import UNet2DConditionModel

    from styleinject import StyleInjectConfig, inject, save_adapter

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_path, subfolder="unet")
    inject(unet, StyleInjectConfig(rank=4, num_styles=2, alpha=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".si_" in name:
                param.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter") / "style"
    save_adapter(unet, out)
    return out


def test_evaluate_adapter_writes_report(tiny_pipeline_path, tiny_adapter, tiny_clip_dir, tiny_pickscore_dirs, tmp_path):
    pick_model, pick_processor = tiny_pickscore_dirs
    calls = []
    report = evaluate_adapter(
        tiny_pipeline_path, tiny_adapter, prompts=PROMPTS, seeds=(0,), steps=2, width=64, height=64,
        scorers=("clipscore", "pickscore"),
        scorer_paths={"clipscore": tiny_clip_dir, "pickscore": pick_model, "pickscore_processor": pick_processor},
        output_dir=tmp_path, save_images=True, device="cpu", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["adapter"] == str(tiny_adapter)
    assert report["settings"]["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert report["scorers"]["clipscore"]["w"] == 2.5 and report["scorers"]["pickscore"]["offset"] == 21.0

    samples = report["samples"]
    assert [(s["prompt_id"], s["seed"]) for s in samples] == [("animals-00", 0), ("food-00", 0)]
    # the scores are the scorers' scores of the saved (lossless PNG) images
    images = [Image.open(tmp_path / s["image"]) for s in samples]
    assert images[0].size == (64, 64)
    clip = CLIPScorer(str(tiny_clip_dir), device="cpu").score(images, [p.text for p in PROMPTS])
    pick = PickScorer(str(pick_model), str(pick_processor), device="cpu").score(images, [p.text for p in PROMPTS])
    torch.testing.assert_close(torch.tensor([s["clipscore"] for s in samples]), torch.tensor(clip))
    torch.testing.assert_close(torch.tensor([s["pickscore"] for s in samples]), torch.tensor(pick))

    overall = report["summary"]["overall"]["clipscore"]
    assert overall["n_prompts"] == 2 and overall["n_samples"] == 2
    assert math.isclose(overall["mean"], sum(clip) / 2, rel_tol=1e-6)
    assert report["summary"]["by_category"]["food"]["pickscore"]["ci95"] is None  # one prompt: no interval

    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [r["prompt_id"] for r in rows] == ["animals-00", "food-00"]
    assert math.isclose(float(rows[1]["pickscore"]), pick[1], abs_tol=1e-5)
    summary = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["category"], r["scorer"]) for r in summary][:2] == [("overall", "clipscore"), ("overall", "pickscore")]
    assert len(summary) == 6

    # the adapter is really applied: the base model alone gives other images
    base = evaluate_adapter(tiny_pipeline_path, None, prompts=PROMPTS[:1], seeds=(0,), steps=2, width=64,
                            height=64, scorers=[CLIPScorer(str(tiny_clip_dir), device="cpu")],
                            output_dir=tmp_path / "base", save_images=True, device="cpu")
    base_image = Image.open(tmp_path / "base" / base["samples"][0]["image"])
    assert base_image.tobytes() != images[0].tobytes()


def test_scorer_weights_fail_before_generation(tiny_pipeline_path, tmp_path):
    from styleinject.eval.scorers import ScorerLoadError

    with pytest.raises(ScorerLoadError, match="clip_model"):
        evaluate_adapter(tiny_pipeline_path, prompts=["a cat"], seeds=(0,), steps=1, width=64, height=64,
                         scorer_paths={"clipscore": tmp_path / "nope"}, device="cpu")
    with pytest.raises(ValueError, match="unknown scorer_paths keys"):
        evaluate_adapter(tiny_pipeline_path, prompts=["a cat"], scorer_paths={"clip": "x"}, device="cpu")
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        evaluate_adapter(tiny_pipeline_path, tmp_path / "missing", prompts=["a cat"], device="cpu")


def test_image_file_names_are_safe_and_unique():
    from styleinject.eval.runner import _file_stems

    stems = _file_stems(["animals-00", "../../etc/passwd", "a/b", "a_b", "..."])
    assert stems == {"animals-00": "animals-00", "../../etc/passwd": "etc_passwd", "a/b": "a_b",
                     "a_b": "a_b-3", "...": "prompt"}


def test_t_quantiles_and_interval():
    assert t_quantile_975(1) == 12.7062 and t_quantile_975(30) == 2.0423
    for df, exact in ((40, 2.0211), (60, 2.0003), (120, 1.9799), (1000, 1.9623)):
        assert abs(t_quantile_975(df) - exact) < 2e-4
    stats = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert stats["mean"] == 2.5 and math.isclose(stats["std"], math.sqrt(5 / 3))
    assert math.isclose(stats["ci95"], 3.1824 * math.sqrt(5 / 3) / 2)
    assert math.isclose(stats["ci_low"], 2.5 - stats["ci95"]) and mean_ci([7.0])["ci95"] is None


def test_interval_is_over_prompt_means():
    rows = [{"prompt_id": p, "category": c, "s": v}
            for p, c, v in (("a", "x", 1.0), ("a", "x", 3.0), ("b", "x", 5.0), ("b", "x", 7.0), ("c", "y", 0.0))]
    summary = summarize(rows, ["s"])
    x = summary["by_category"]["x"]["s"]
    assert (x["n_prompts"], x["n_samples"], x["mean"]) == (2, 4, 4.0)
    assert math.isclose(x["ci95"], 12.7062 * math.sqrt(8.0) / math.sqrt(2))  # prompt means 2 and 6: sd sqrt(8)
    assert summary["overall"]["s"]["n_prompts"] == 3
