"""The claims experiments' statistics, data rules and cipher student (no training)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from styleinject.eval.toyworld import claims
from styleinject.eval.toyworld.render import caption, scene_at


def test_t_test_p_values_match_the_critical_values():
    for t, df in [(12.706, 1), (4.303, 2), (2.776, 4), (2.228, 10)]:
        assert claims.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)
    assert claims.t_two_sided_p(0.0, 3) == 1.0 and claims.t_two_sided_p(math.inf, 3) == 0.0


def test_holm_steps_down():
    out = claims.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert out["a"] == {"p_holm": pytest.approx(0.03), "reject": True}
    assert out["c"]["p_holm"] == pytest.approx(0.06) and out["b"]["p_holm"] == pytest.approx(0.06)
    assert not out["b"]["reject"]


def test_paired_bootstrap_and_calibration_find_a_planted_effect():
    rng = np.random.default_rng(0)
    assert claims.paired_bootstrap(np.ones(50))["p"] == 0.0
    null = claims.paired_bootstrap(rng.choice([-1, 0, 0, 1], size=400))
    assert null["p"] > 0.05 and null["ci95"][0] < 0 < null["ci95"][1]
    # two arms with hit rate ~0.5 over 200 units: a 0.2 drop is detected, 0.01 is not
    a, b = (rng.random(200) < 0.5).astype(float), (rng.random(200) < 0.5).astype(float)
    cal = claims.calibrate({"x": {"si": a, "other": b, "diffs": a - b}}, fractions=(0.02, 0.4), reps=40, n_boot=400)
    small, big = cal["x"]["curve"]
    assert small["power"] < 0.5 < 0.8 <= big["power"]
    assert cal["x"]["threshold"] == pytest.approx(big["planted_effect"])
    assert big["planted_effect"] == pytest.approx(0.4 * a.mean(), abs=0.03)


def test_mutual_information_and_largest_fall():
    labels = ["p", "s", "o"] * 50
    assert claims._mutual_information(labels, np.array([0, 1, 2] * 50)) == pytest.approx(math.log2(3))
    assert claims._mutual_information(labels, np.zeros(150, dtype=int)) == pytest.approx(0.0)
    assert claims.largest_fall([0.2, 0.5, 0.4, 0.45, 0.3, 0.6]) == pytest.approx(0.2)
    assert claims.largest_fall([0.1, 0.2, 0.3]) == 0.0


def test_multistyle_rules():
    scene = scene_at(2, 0)
    assert claims.target_style(scene, 4, "named") == "stripes"
    assert claims.target_style(scene, 4, "cue") == claims.STYLE_BY_BACKGROUND[scene.background]
    assert claims.prompt_for(scene, "outline", "named") == caption(scene) + " in outline style"
    assert claims.prompt_for(scene, "outline", "cue") == caption(scene)


def test_cipher_student_reads_the_cipher_vocabulary(tmp_path):
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from styleinject.assets import TOY_BASE

    table = claims.cipher_map(0)
    assert sorted(table) == sorted(table.values()) and all(k != v for k, v in table.items())
    text = "two red circles, white background"
    assert claims.encipher(text, table) == " ".join(
        [table["background"], table["white"], table["circles"] + ",", table["red"], table["two"]])
    student = claims.build_student(str(TOY_BASE), tmp_path / "student", table)
    tok = CLIPTokenizer.from_pretrained(student / "tokenizer")
    base = CLIPTextModel.from_pretrained(TOY_BASE / "text_encoder").get_input_embeddings().weight
    new = CLIPTextModel.from_pretrained(student / "text_encoder").get_input_embeddings().weight
    for word in ("red", "circles", "background"):
        (src,), (dst,) = (tok(w, add_special_tokens=False).input_ids for w in (word, table[word]))
        torch.testing.assert_close(new[dst], base[src], rtol=0, atol=0)


def test_resolved_differences_count_shared_runs_once(tmp_path):
    def row(variant, seed, v, run):
        return {"variant": variant, "seed": seed, "run": run, "style": v, "style_dist": 0.0, "all": v, "clipscore": v}

    rows = [row("ref", s, 0.5, f"r{s}") for s in range(3)] + [row("b", s, 0.6 + 0.01 * s, f"b{s}") for s in range(3)]
    for name in ("one.json", "two.json"):  # the same runs in two experiments
        (tmp_path / name).write_text(json.dumps({"rows": rows}))
    reverse = [r for r in rows if r["variant"] == "b"] + [r for r in rows if r["variant"] == "ref"]
    (tmp_path / "three.json").write_text(json.dumps({"rows": reverse}))  # and reversed (ref - b)
    (tmp_path / "alignment.json").write_text(json.dumps({"summary": {}}))  # not an experiment: skipped
    found = claims.resolved_differences(sorted(tmp_path.glob("*.json")))
    assert len(found) == 4  # b - ref on four metrics, once
    style = next(f for f in found if f["metric"] == "style")
    assert style["mean"] == pytest.approx(0.11) and style["resolved_unadjusted"] and style["same_sign_seeds"] == 3
    assert next(f for f in found if f["metric"] == "style_dist")["p"] == 1.0


def test_multistyle_comparisons_pair_units_and_give_verdicts():
    rng = np.random.default_rng(1)

    def rows(mode, p_si, p_lora):
        out = []
        for seed in (0, 1):
            for name, p in (("styleinject r4 n4", p_si), ("lora r4", p_lora)):
                out.append({"variant": name, "mode": mode, "seed": seed,
                            "style_hits": list(rng.random(100) < p), "all_hits": list(rng.random(100) < 0.4)})
        return out

    results, tests = claims.multistyle_comparisons({"named": rows("named", 0.9, 0.2), "cue": rows("cue", 0.1, 0.8)})
    assert len(results) == 4 and all(len(t["diffs"]) == 200 for t in tests.values())
    assert results["named | style | styleinject - lora r4"]["verdict"] == "supported"
    assert results["cue | style | styleinject - lora r4"]["verdict"] == "contradicted"
    assert results["named | all | styleinject - lora r4"]["verdict"] == "not detectable"


def _drift_row(variant, seed, curve):
    shares = {"sta": 0.01, "router": 0.05, "styled_layers": 0.2, "plain_layers": 0.9} if variant.startswith("styleinject") \
        else {"sta": None, "router": None, "styled_layers": None, "plain_layers": 1.0}
    return {"variant": variant, "seed": seed, "params": 100, "largest_fall": claims.largest_fall(curve[1:]),
            "curve": [{"step": 300 * i, "all": v} for i, v in enumerate(curve)], "shares": {"shares": shares}}


def test_drift_report_pairs_seeds_applies_holm_and_calibrates():
    si, far, same = "styleinject r32 n16", "lora far", "lora same"
    rows = []
    for seed, noise in enumerate([0.00, 0.02, 0.01, 0.01, 0.03]):
        base = [0.4, 0.5, 0.55 + noise, 0.55]
        rows.append(_drift_row(si, seed, base))
        rows.append(_drift_row(far, seed, [0.4, 0.5, 0.55 + noise, 0.25]))   # falls exactly 0.30 further
        rows.append(_drift_row(same, seed, [0.4, 0.5, 0.55 + noise, 0.55 + (0.02 if seed % 2 else -0.02)]))
    rep = claims.drift_report(rows, calibration_reps=60)
    far_test, same_test = rep["drift_comparisons"][f"{far} - {si}"], rep["drift_comparisons"][f"{same} - {si}"]
    assert far_test["seeds"] == [0, 1, 2, 3, 4] and far_test["mean"] == pytest.approx(0.30)
    assert far_test["verdict"] == "supported" and far_test["p_t"] < 0.001
    assert same_test["verdict"] == "not detectable" and same_test["p_t"] > 0.05
    # Holm over the two LoRAs: the larger p is compared at alpha, the smaller at alpha / 2
    assert same_test["p_holm"] >= same_test["p"] and far_test["p_holm"] == pytest.approx(min(1, 2 * far_test["p"]))
    cal = rep["drift_calibration"][f"{same} - {si}"]
    assert 0 <= cal["false_positive_rate"] <= 1
    assert cal["curve"][0]["power"] < 0.8 <= cal["curve"][-1]["power"] and cal["threshold"] is not None
    summary = rep["drift_summary"][si]
    assert summary["steps"] == [0, 300, 600, 900] and summary["mean_curve"][1] == pytest.approx(0.5)
    assert summary["shares"] == {"sta": 0.01, "router": 0.05, "styled_layers": 0.2, "plain_layers": 0.9}
    assert set(rep["drift_summary"][far]["shares"]) == {"plain_layers"}


def test_pending_runs_skip_and_collect_cached_rows(tmp_path):
    cfg_a, cfg_b = claims.StyleInjectConfig(), claims.StyleInjectConfig.lora(rank=4)
    variants = {"a": cfg_a, "b": cfg_b}
    cached = tmp_path / "cache" / "b-1"
    cached.mkdir(parents=True)
    (cached / "row.json").write_text(json.dumps({"variant": "old name", "seed": 1, "x": 7}))
    rows, log = [], []
    todo = list(claims._pending_runs(variants, [0, 1], ["B"], tmp_path,
                                     lambda cfg, seed: f"{'a' if cfg is cfg_a else 'b'}-{seed}", rows, log.append))
    assert [(n, s, d.name) for n, _, s, d in todo] == [("b", 0, "b-0")]
    assert rows == [{"variant": "b", "seed": 1, "x": 7}] and log == ["cached: b seed 1"]


def test_flat_curve_fall_is_what_sampling_alone_gives():
    assert claims.flat_curve_fall(0.5, 100, 1) == 0.0  # one checkpoint cannot fall
    assert claims.flat_curve_fall(1.0, 100, 8) == 0.0  # no sampling noise
    few, many = claims.flat_curve_fall(0.4, 100, 8, reps=4000), claims.flat_curve_fall(0.4, 10_000, 8, reps=4000)
    assert 0.08 < few < 0.16 and many < few / 5  # ~2.5 binomial sd at 100 prompts; shrinks as 1/sqrt(n)
