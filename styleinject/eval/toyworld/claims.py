"""The paper's central claims on the toy world (issue 17; design pre-registered in docs/results.md 5).

    python -m styleinject.eval.toyworld.claims multistyle --mode named --seeds 0 1
    python -m styleinject.eval.toyworld.claims multistyle --mode cue --seeds 0 1
    python -m styleinject.eval.toyworld.claims drift --steps 1200 --every 300 --seeds 0
    python -m styleinject.eval.toyworld.claims analyse runs/claims        # tests, Holm, calibration
    python -m styleinject.eval.toyworld.claims resolved docs/results/*.json  # every resolved difference

**multistyle** (C1): one adapter trained on three styles at once; (a) ``named``: the caption names
the style, (b) ``cue``: the scene's background fixes it. Per held-out (prompt, seed): did the
checker read the target style (``style``), shape + colour + count (``all``). Also each routed
layer's router-style mutual information, trained against untrained.

**drift** (C2): cross-lingual distillation, output KD only: the student (the toy base with a text
encoder that reads a cipher vocabulary) learns from ``models/toy-teacher-stripes`` prompted with
the original captions. Attribute accuracy on cipher prompts at every checkpoint; endpoint: the
largest fall from the running peak.

**analyse**: paired bootstrap over (prompt, seed) units, two-sided p, Holm over the family, and the
sensitivity calibration (planted effects). Runs are cached like ``experiments.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from styleinject import StyleInjectConfig
from styleinject.assets import TOY_BASE

from ..mechanism import record_unet_inputs
from .alignment import PROMPT_SEED
from .checker import correct, load_checker
from .experiments import DATA_SEED, adapter_params, adapter_shares, lora_matching, run_key
from .render import caption, render, scene_at
from .styles import STYLES, apply_style

MODES = ("named", "cue")
STYLE_BY_BACKGROUND = {"white": "pastel", "black": "stripes", "grey": "outline"}
TARGETS, CONVS = ["to_q", "to_v"], ["conv1", "conv2"]
N_TRAIN = 999
ALPHA = 0.05


def _pending_runs(variants: dict[str, StyleInjectConfig], seeds, only, root: Path, key_of, rows: list, log):
    """Each (variant, seed) run still to do, as (name, cfg, seed, run_dir); finished runs' cached rows
    go straight into ``rows``. ``key_of(cfg, seed)`` names the run's cache folder."""
    for name, cfg in variants.items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        for seed in seeds:
            run_dir = root / "cache" / key_of(cfg, seed)
            if (run_dir / "row.json").exists():
                rows.append({**json.loads((run_dir / "row.json").read_text()), "variant": name})
                log(f"cached: {name} seed {seed}")
                continue
            yield name, cfg, seed, run_dir


def _write_rows(out: Path, experiment: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(
        {**experiment, "rows": rows, "machine": _machine(),
         "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")


# -- C1: multi-style ------------------------------------------------------------------------

def target_style(scene, index: int, mode: str) -> str:
    return STYLES[index % len(STYLES)] if mode == "named" else STYLE_BY_BACKGROUND[scene.background]


def prompt_for(scene, style: str, mode: str) -> str:
    return f"{caption(scene)} in {style} style" if mode == "named" else caption(scene)


def write_multistyle(out: Path, mode: str, n: int = N_TRAIN) -> Path:
    marker = out / ".scenes.jsonl"
    if marker.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        scene = scene_at(DATA_SEED, i)
        style = target_style(scene, i, mode)
        apply_style(render(scene), style).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(prompt_for(scene, style, mode) + "\n")
        lines.append(json.dumps({"file_name": f"{i:06d}.png", "style": style, **scene.to_dict()}) + "\n")
    marker.write_text("".join(lines))
    return out


def multistyle_variants(model: str) -> dict[str, StyleInjectConfig]:
    si = StyleInjectConfig(rank=4, num_styles=4, target_modules=TARGETS, style_modules=TARGETS + CONVS,
                           conv_target_modules=CONVS, a_init="mixture")
    return {"styleinject r4 n4 (DMA+STA everywhere)": si,
            "lora r4 (same rank)": StyleInjectConfig.lora(rank=4, target_modules=TARGETS, conv_target_modules=CONVS),
            "lora, params = styleinject": lora_matching(model, si, CONVS)}


def held_out(mode: str, n: int):
    scenes = [scene_at(PROMPT_SEED, i) for i in range(n)]
    styles = [target_style(s, i, mode) for i, s in enumerate(scenes)]
    return scenes, styles, [prompt_for(s, st, mode) for s, st in zip(scenes, styles, strict=True)]


def _generate(pipe, prompts, seed: int, adapter: str | None, batch: int = 50):
    from styleinject.pipeline import generate

    images = []
    for i in range(0, len(prompts), batch):
        images += generate(pipe, prompts[i:i + batch], seed=seed * 100003 + i, steps=30, guidance_scale=4.0,
                           width=32, height=32, adapter=adapter)
    return images


def _mutual_information(labels: list[str], choices: np.ndarray) -> float:
    """I(label; choice) in bits from paired samples."""
    lab = {v: i for i, v in enumerate(sorted(set(labels)))}
    joint = np.zeros((len(lab), int(choices.max()) + 1))
    for l, c in zip(labels, choices, strict=True):
        joint[lab[l], c] += 1
    joint /= joint.sum()
    pl, pc = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pl @ pc)[nz])).sum())


def router_mi(unet, adapter_name: str, inputs: list[dict], labels: list[str]) -> dict:
    """Per routed layer, I(argmax s; target style) over every sample of ``inputs`` (both halves of
    a guided batch carry their prompt's label); mean and max over layers."""
    from styleinject.adapters.layers import StyleInjectLayer
    from styleinject.adapters.model import set_adapter

    set_adapter(unet, adapter_name)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, StyleInjectLayer)
              and adapter_name in m.si_router_weight and m.si_options[adapter_name]["num_styles"] > 1}
    picks: dict[str, list] = {n: [] for n in layers}
    for name, layer in layers.items():
        original = layer._route

        def recording(n_, x, _orig=original, _name=name):
            s = _orig(n_, x)
            picks[_name].append(s.argmax(dim=-1).cpu().numpy())
            return s

        layer.__dict__["_route"] = recording
    try:
        with torch.no_grad():
            for x in inputs:
                unet(**{**x, "return_dict": False})
    finally:
        for layer in layers.values():
            del layer.__dict__["_route"]
    batch = inputs[0]["sample"].shape[0]
    per_call = labels * (batch // len(labels))  # a guided batch: [uncond prompts; cond prompts]
    mi = {n: _mutual_information(per_call * len(inputs), np.concatenate(p)) for n, p in picks.items()}
    return {"mean": float(np.mean(list(mi.values()))), "max": float(max(mi.values())), "per_layer": mi}


def run_multistyle(mode: str, *, model: str, checker: str, seeds, steps: int, lr: float, batch_size: int,
                   n_eval: int, root: Path, only=(), log=print) -> list[dict]:
    from styleinject.adapters import delete_adapter, inject, load_adapter
    from styleinject.pipeline import load_pipeline
    from styleinject.train import TrainConfig, run_training

    data = write_multistyle(root / f"data-multistyle-{mode}", mode)
    chk = load_checker(checker)
    pipe = load_pipeline(model, device="cpu")
    scenes, styles, prompts = held_out(mode, n_eval)

    def key_of(cfg, seed):
        return run_key(kind="multistyle", mode=mode, model=model, adapter=cfg.to_dict(), steps=steps, lr=lr,
                       batch_size=batch_size, seed=seed, n_eval=n_eval, n_train=N_TRAIN)

    rows = []
    for name, cfg, seed, run_dir in _pending_runs(multistyle_variants(model), seeds, only, root, key_of, rows, log):
        t0 = time.time()
        result = run_training(TrainConfig(
            kind="finetune", base_model=model, data=str(data), output_dir=str(run_dir), steps=steps,
            resolution=32, batch_size=batch_size, learning_rate=lr, seed=seed, checkpoint_every=0,
            resume="latest" if (run_dir / "checkpoints").exists() else None, adapter=copy.deepcopy(cfg)))
        train_s = time.time() - t0
        load_adapter(pipe.unet, run_dir, "trained")
        images = _generate(pipe, prompts, seed, "trained")
        hits = correct(chk, images, scenes, styles)
        row = {"variant": name, "mode": mode, "seed": seed, "params": adapter_params(model, cfg),
               "final_loss": result.loss, "train_s": round(train_s, 1), "run": run_dir.name,
               "style_hits": [bool(v) for v in hits["style"]], "all_hits": [bool(v) for v in hits["all"]],
               "target_styles": styles, "shares": adapter_shares(model, run_dir)}
        if cfg.num_styles > 1:
            inputs = record_unet_inputs(pipe, prompts, seeds=(seed,), steps=30, guidance=4.0,
                                        at_steps=(0, 10, 20, 29), width=32, height=32)
            row["router_mi"] = router_mi(pipe.unet, "trained", inputs, styles)
            torch.manual_seed(seed)
            inject(pipe.unet, copy.deepcopy(cfg), "untrained")
            row["router_mi_untrained"] = router_mi(pipe.unet, "untrained", inputs, styles)
            delete_adapter(pipe.unet, "untrained")
        delete_adapter(pipe.unet, "trained")
        (run_dir / "row.json").write_text(json.dumps(row) + "\n")
        rows.append(row)
        log(json.dumps({k: v for k, v in row.items() if not k.endswith(("hits", "styles"))}))
    _write_rows(root / f"multistyle-{mode}", {"experiment": "multistyle", "mode": mode, "steps": steps, "lr": lr,
                                              "batch_size": batch_size, "seeds": list(seeds), "n_eval_prompts": n_eval},
                rows)
    return rows


# -- C2: drift under cross-lingual distillation -----------------------------------------------

def cipher_map(seed: int = 0) -> dict[str, str]:
    """A fixed derangement of the toy vocabulary: every word maps to another toy word."""
    from .text import toy_words

    words = toy_words()
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(len(words))
        if not np.any(perm == np.arange(len(words))):
            return {w: words[p] for w, p in zip(words, perm, strict=True)}


def encipher(text: str, table: dict[str, str]) -> str:
    """Word substitution plus reversed word order (punctuation stays attached to its word)."""
    out = []
    for token in text.split():
        core = token.rstrip(",.")
        out.append(table.get(core, core) + token[len(core):])
    return " ".join(reversed(out))


def build_student(model: str, out: Path, table: dict[str, str]) -> Path:
    """The toy base whose text encoder reads the cipher vocabulary: the token-embedding row of each
    cipher word is the original word's row (built once; word order is left for the adapter)."""
    if (out / "model_index.json").exists():
        return out
    from transformers import CLIPTextModel, CLIPTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp)
    tok = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    enc = CLIPTextModel.from_pretrained(tmp / "text_encoder")
    emb = enc.get_input_embeddings().weight
    with torch.no_grad():
        original = emb.clone()
        for word, code in table.items():
            (src,), (dst,) = tok(word, add_special_tokens=False).input_ids, tok(code, add_special_tokens=False).input_ids
            emb[dst] = original[src]
    enc.save_pretrained(tmp / "text_encoder")
    tmp.rename(out)
    return out


def write_drift_data(out: Path, table: dict[str, str], n: int = N_TRAIN) -> Path:
    marker = out / "metadata.jsonl"
    if marker.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        scene = scene_at(DATA_SEED, i)
        apply_style(render(scene), "stripes").save(out / f"{i:06d}.png")
        lines.append(json.dumps({"file_name": f"{i:06d}.png", "text": encipher(caption(scene), table),
                                 "teacher_text": caption(scene)}) + "\n")
    marker.write_text("".join(lines))
    return out


def drift_variants(model: str) -> dict[str, StyleInjectConfig]:
    si = StyleInjectConfig(conv_target_modules=CONVS)  # the paper's distillation placement (3.5)
    return {"styleinject r32 n16 + convs (paper)": si,
            "lora + convs, params = styleinject": lora_matching(model, si, CONVS),
            "lora r64 + convs (full rank)": StyleInjectConfig.lora(rank=64, target_modules=TARGETS,
                                                                  conv_target_modules=CONVS)}


def largest_fall(curve: list[float]) -> float:
    peak, fall = -np.inf, 0.0
    for v in curve:
        peak = max(peak, v)
        fall = max(fall, peak - v)
    return float(fall)


def run_drift(*, model: str, teacher: str, checker: str, seeds, steps: int, every: int, lr: float,
              batch_size: int, n_eval: int, root: Path, only=(), log=print) -> list[dict]:
    from styleinject.adapters import delete_adapter, load_adapter
    from styleinject.pipeline import load_pipeline
    from styleinject.train import TrainConfig, run_training

    table = cipher_map(0)
    student = build_student(model, root / "student-cipher", table)
    data = write_drift_data(root / "data-drift-cipher", table)
    chk = load_checker(checker)
    pipe = load_pipeline(str(student), device="cpu")
    scenes = [scene_at(PROMPT_SEED, i) for i in range(n_eval)]
    prompts = [encipher(caption(s), table) for s in scenes]

    def attribute_acc(seed: int, adapter_dir: Path | None) -> float:
        if adapter_dir is None:
            images = _generate(pipe, prompts, seed, None)
        else:
            load_adapter(pipe.unet, adapter_dir, "ck")
            images = _generate(pipe, prompts, seed, "ck")
            delete_adapter(pipe.unet, "ck")
        return float(np.mean(correct(chk, images, scenes, None)["all"]))

    def key_of(cfg, seed):
        return run_key(kind="drift", model=model, teacher=teacher, adapter=cfg.to_dict(), steps=steps, every=every,
                       lr=lr, batch_size=batch_size, seed=seed, n_eval=n_eval)

    rows = []
    for name, cfg, seed, run_dir in _pending_runs(drift_variants(model), seeds, only, root, key_of, rows, log):
        t0 = time.time()
        result = run_training(TrainConfig(
            kind="distill", base_model=str(student), teacher_model=teacher, data=str(data),
            output_dir=str(run_dir), steps=steps, resolution=32, batch_size=batch_size, learning_rate=lr,
            seed=seed, checkpoint_every=every, keep_checkpoints=0,
            resume="latest" if (run_dir / "checkpoints").exists() else None, adapter=copy.deepcopy(cfg)))
        train_s = time.time() - t0
        curve = [{"step": 0, "all": attribute_acc(seed, None)}]
        for ck in result.checkpoints:
            curve.append({"step": int(ck.name.split("-")[1]), "all": attribute_acc(seed, ck)})
        row = {"variant": name, "seed": seed, "params": adapter_params(str(student), cfg), "train_s": round(train_s, 1),
               "final_loss": result.loss, "run": run_dir.name, "curve": curve,
               "largest_fall": largest_fall([c["all"] for c in curve[1:]]),
               "shares": adapter_shares(str(student), run_dir)}
        (run_dir / "row.json").write_text(json.dumps(row) + "\n")
        rows.append(row)
        log(json.dumps(row))
    _write_rows(root / "drift", {"experiment": "drift", "steps": steps, "every": every, "lr": lr,
                                 "batch_size": batch_size, "seeds": list(seeds), "n_eval_prompts": n_eval,
                                 "teacher": teacher, "cipher_seed": 0}, rows)
    return rows


# -- statistics -------------------------------------------------------------------------------

def paired_bootstrap(diffs: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Mean of per-unit differences, 95% percentile interval and two-sided bootstrap p."""
    rng = np.random.default_rng(seed)
    diffs = np.asarray(diffs, dtype=float)
    means = diffs[rng.integers(0, len(diffs), size=(n_boot, len(diffs)))].mean(axis=1)
    p = 2 * min((means <= 0).mean(), (means >= 0).mean())
    return {"mean": float(diffs.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "p": float(min(1.0, p)), "n_units": int(len(diffs))}


def holm(pvalues: dict[str, float], alpha: float = ALPHA) -> dict[str, dict]:
    """Holm's step-down adjusted p-values and rejections."""
    order = sorted(pvalues, key=pvalues.get)
    m, running, out = len(order), 0.0, {}
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[key]))
        out[key] = {"p_holm": running, "reject": running < alpha}
    return out


def _units(rows: list[dict], variant: str, endpoint: str) -> dict[tuple, float]:
    return {(r["seed"], i): float(v) for r in rows if r["variant"] == variant
            for i, v in enumerate(r[f"{endpoint}_hits"])}


def multistyle_comparisons(rows_by_mode: dict[str, list[dict]]) -> dict[str, dict]:
    """StyleInject minus each LoRA, per (prompt, seed), per mode and endpoint; Holm over all."""
    tests = {}
    for mode, rows in rows_by_mode.items():
        names = list(dict.fromkeys(r["variant"] for r in rows))
        si = next(n for n in names if n.startswith("styleinject"))
        for other in names:
            if other == si:
                continue
            for endpoint in ("style", "all"):
                a, b = _units(rows, si, endpoint), _units(rows, other, endpoint)
                keys = sorted(set(a) & set(b))
                if keys:
                    tests[f"{mode} | {endpoint} | styleinject - {other}"] = {
                        "diffs": np.array([a[k] - b[k] for k in keys]),
                        "si": np.array([a[k] for k in keys]), "other": np.array([b[k] for k in keys])}
    results = {k: paired_bootstrap(t["diffs"]) for k, t in tests.items()}
    for k, h in holm({k: r["p"] for k, r in results.items()}).items():
        results[k].update(h)
        results[k]["verdict"] = ("supported" if results[k]["mean"] > 0 else "contradicted") if h["reject"] \
            else "not detectable"
    return results, tests


def calibrate(tests: dict[str, dict], fractions=(0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0), reps: int = 200,
              n_boot: int = 2000, power: float = 0.8, seed: int = 0) -> dict:
    """Smallest planted effect each comparison's test detects with ``power``.

    Null data with the measured pairing structure: each unit's two values are swapped at random
    (exchangeable arms, no true difference). Planted effect: a fraction f of the first arm's hits
    become misses, a drop of about f x its hit rate. Detected: bootstrap p < alpha / m, the Holm
    step a single true effect among m comparisons must pass. Returns per comparison the planted
    effect (in accuracy points) and power per f, and the threshold: the smallest effect with
    power >= ``power`` (None: not reached at the largest f)."""
    rng = np.random.default_rng(seed)
    m = len(tests)
    out = {}
    for key, t in tests.items():
        a, b = t["si"], t["other"]
        n = len(a)
        curve = []
        for f in fractions:
            detected, effects = 0, []
            for _ in range(reps):
                swap = rng.random(n) < 0.5
                x, y = np.where(swap, b, a), np.where(swap, a, b)
                planted = np.where((x > 0) & (rng.random(n) < f), 0.0, x)
                effects.append(float((x - planted).mean()))
                res = paired_bootstrap(planted - y, n_boot=n_boot, seed=int(rng.integers(1 << 31)))
                detected += res["p"] < ALPHA / m
            curve.append({"fraction": f, "planted_effect": float(np.mean(effects)), "power": detected / reps})
        reached = [c["planted_effect"] for c in curve if c["power"] >= power]
        out[key] = {"curve": curve, "threshold": min(reached) if reached else None}
    return out


# -- every resolved paired difference of the earlier experiments -----------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (Numerical Recipes' betacf)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + aa / c
            c = c if abs(c) > 1e-300 else 1e-300
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    import math

    if not math.isfinite(t):
        return 0.0
    x, a, b = df / (df + t * t), df / 2.0, 0.5
    if x <= 0:
        return 0.0
    if x >= 1:  # t = 0 (or rounds to it)
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def resolved_differences(paths, metrics=("style", "style_dist", "all", "clipscore")) -> list[dict]:
    """Every paired difference (variant minus the table's first variant, per training seed) of the
    experiment results in ``paths``, with a paired t-test p and Holm over all of them together."""
    import math

    from .experiments import paired_differences

    found, seen = [], set()
    for path in paths:
        results = json.loads(Path(path).read_text())
        if "rows" not in results:  # not an experiment's results (e.g. the base model's alignment)
            continue
        rows = results["rows"]
        by = {}
        for r in rows:
            by.setdefault(r["variant"], {})[r["seed"]] = r
        ref = next(iter(by))
        for name, d in paired_differences(rows, metrics).items():
            for metric, stat in d.items():
                seeds = sorted(set(by[name]) & set(by[ref]))
                # experiments share cached runs (the ablation's "neither" is equal-params' LoRA r32;
                # the n sweep's n=16 - n=1 is the ablation's STA only - DMA+STA reversed): each
                # distinct comparison counts once in the Holm family, in the direction first met
                runs = [tuple(by[v][s].get("run") for s in seeds) for v in (name, ref)]
                same = (tuple(sorted(runs)), metric)
                if None not in runs[0] + runs[1] and same in seen:
                    continue
                seen.add(same)
                diffs = [by[name][s][metric] - by[ref][s][metric] for s in seeds]
                n = len(diffs)
                if n < 2:
                    continue
                sd = float(np.std(diffs, ddof=1))
                t = stat["mean"] / (sd / math.sqrt(n)) if sd > 0 else (math.inf if stat["mean"] else 0.0)
                found.append({"file": Path(path).name, "reference": ref, "variant": name, "metric": metric,
                              "mean": stat["mean"], "ci95": stat["ci95"], "n_seeds": n,
                              "same_sign_seeds": int(max(sum(x > 0 for x in diffs), sum(x < 0 for x in diffs))),
                              "p": t_two_sided_p(t, n - 1) if t != 0 else 1.0})
    adjusted = holm({i: f["p"] for i, f in enumerate(found)})
    for i, f in enumerate(found):
        f.update(adjusted[i])
        f["resolved_unadjusted"] = f["p"] < ALPHA
    return found


def _machine() -> str:
    return (f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def drift_comparisons(rows: list[dict]) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """C2's test: each LoRA's largest fall minus StyleInject's, paired per seed (bootstrap over
    seeds), Holm over the LoRAs. Also returns the per-seed differences (for the calibration)."""
    falls: dict[str, dict[int, float]] = {}
    for r in rows:
        falls.setdefault(r["variant"], {})[r["seed"]] = r["largest_fall"]
    si = next((n for n in falls if n.startswith("styleinject")), None)
    tests, diffs = {}, {}
    for name, mine in falls.items():
        seeds = sorted(set(mine) & set(falls.get(si, {})))
        if name != si and len(seeds) >= 2:
            key = f"{name} - {si}"
            diffs[key] = np.array([mine[s] - falls[si][s] for s in seeds])
            tests[key] = {**paired_bootstrap(diffs[key]), "seeds": seeds, "p_t": _paired_t_p(diffs[key])}
    for key, h in holm({k: t["p"] for k, t in tests.items()}).items():
        tests[key].update(h)
        tests[key]["verdict"] = ("supported" if tests[key]["mean"] > 0 else "contradicted") if h["reject"] \
            else "not detectable"
    return tests, diffs


def _paired_t_p(d: np.ndarray) -> float:
    """Paired t-test p (a secondary check, not pre-registered: over 5 seeds the bootstrap is liberal)."""
    sd = float(np.std(d, ddof=1))
    if sd == 0:
        return 1.0 if float(np.mean(d)) == 0 else 0.0
    return t_two_sided_p(float(np.mean(d)) / (sd / np.sqrt(len(d))), len(d) - 1)


def calibrate_drift(diffs: dict[str, np.ndarray], effects=tuple(np.round(np.arange(0.01, 0.301, 0.01), 2)),
                    reps: int = 200, n_boot: int = 2000, power: float = 0.8, seed: int = 0) -> dict:
    """Smallest planted difference in largest fall that C2's test detects with ``power``.

    Null data with the measured per-seed spread: each seed's difference gets a random sign
    (exchangeable arms). Planted: ``effect`` added to every seed's difference (the LoRA falls that
    much further). Detected: bootstrap p < alpha / m, the Holm step a single true effect must pass.
    ``false_positive_rate``: the same with nothing planted; with a handful of seeds a percentile
    bootstrap is liberal, and this says how much."""
    rng = np.random.default_rng(seed)
    m = len(diffs)
    out = {}
    for key, d in diffs.items():
        curve = []
        for effect in (0.0, *effects):
            detected = 0
            for _ in range(reps):
                null = d * rng.choice([-1.0, 1.0], size=len(d))
                detected += paired_bootstrap(null + effect, n_boot=n_boot, seed=int(rng.integers(1 << 31)))["p"] < ALPHA / m
            curve.append({"planted_effect": float(effect), "power": detected / reps})
        reached = [c["planted_effect"] for c in curve[1:] if c["power"] >= power]
        out[key] = {"false_positive_rate": curve[0]["power"], "curve": curve[1:],
                    "threshold": min(reached) if reached else None}
    return out


def flat_curve_fall(accuracy: float, n_prompts: int, n_checkpoints: int, reps: int = 20_000, seed: int = 0) -> float:
    """The mean largest fall of a curve that does not move: each checkpoint's accuracy drawn
    independently, binomial(n_prompts, accuracy) / n_prompts. What sampling alone puts into the
    endpoint (an upper bound: the same prompts and seeds at every checkpoint correlate the draws)."""
    rng = np.random.default_rng(seed)
    draws = rng.binomial(n_prompts, accuracy, size=(reps, n_checkpoints)) / n_prompts
    return float((np.maximum.accumulate(draws, axis=1) - draws).max(axis=1).mean())


def drift_report(rows: list[dict], calibration_reps: int = 200, n_prompts: int | None = None) -> dict:
    """Per run: curve, largest fall, shares; per variant: the mean curve and fall (and, with
    ``n_prompts``, the fall sampling alone gives a flat curve at its mean accuracy); the paired
    tests with Holm and their calibration."""
    tests, diffs = drift_comparisons(rows)
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        steps = [c["step"] for c in mine[0]["curve"]]
        mean_curve = [float(np.mean([r["curve"][i]["all"] for r in mine])) for i in range(len(steps))]
        summary[name] = {"params": mine[0]["params"], "seeds": [r["seed"] for r in mine], "steps": steps,
                         "mean_curve": mean_curve, "largest_fall": float(np.mean([r["largest_fall"] for r in mine])),
                         "final": mean_curve[-1], "peak": max(mean_curve[1:]),
                         "flat_curve_fall": flat_curve_fall(float(np.mean(mean_curve[1:])), n_prompts, len(steps) - 1)
                         if n_prompts else None,
                         "shares": {p: float(np.mean([r["shares"]["shares"][p] for r in mine]))
                                    for p, v in mine[0]["shares"]["shares"].items() if v is not None}}
    return {"drift": {r["variant"] + f" | seed {r['seed']}": {"largest_fall": r["largest_fall"], "curve": r["curve"],
                                                             "shares": r["shares"]["shares"]} for r in rows},
            "drift_summary": summary, "drift_comparisons": tests,
            "drift_calibration": calibrate_drift(diffs, reps=calibration_reps)}


def analyse(root: Path, out: Path | None = None, calibration_reps: int = 200) -> dict:
    rows_by_mode = {}
    for mode in MODES:
        f = root / f"multistyle-{mode}" / "rows.json"
        if f.exists():
            rows_by_mode[mode] = json.loads(f.read_text())["rows"]
    report: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if rows_by_mode:
        comparisons, tests = multistyle_comparisons(rows_by_mode)
        report["multistyle"] = {"comparisons": comparisons,
                                "calibration": calibrate(tests, reps=calibration_reps)}
        summary = {}
        for mode, rows in rows_by_mode.items():
            for name in dict.fromkeys(r["variant"] for r in rows):
                mine = [r for r in rows if r["variant"] == name]
                entry = {"params": mine[0]["params"], "seeds": [r["seed"] for r in mine],
                         "style_acc": float(np.mean([np.mean(r["style_hits"]) for r in mine])),
                         "attribute_acc": float(np.mean([np.mean(r["all_hits"]) for r in mine])),
                         "per_style_acc": {st: float(np.mean([h for r in mine for h, t in
                                                              zip(r["style_hits"], r["target_styles"]) if t == st]))
                                           for st in STYLES},
                         "shares": {p: float(np.mean([r["shares"]["shares"][p] for r in mine]))
                                    for p in mine[0]["shares"]["shares"] if mine[0]["shares"]["shares"][p] is not None}}
                if "router_mi" in mine[0]:
                    entry["router_mi_bits"] = float(np.mean([r["router_mi"]["mean"] for r in mine]))
                    entry["router_mi_bits_max_layer"] = float(np.mean([r["router_mi"]["max"] for r in mine]))
                    entry["router_mi_bits_untrained"] = float(np.mean([r["router_mi_untrained"]["mean"] for r in mine]))
                summary[f"{mode} | {name}"] = entry
        report["multistyle"]["summary"] = summary
    drift = root / "drift" / "rows.json"
    if drift.exists():
        found = json.loads(drift.read_text())
        report.update(drift_report(found["rows"], calibration_reps=calibration_reps, n_prompts=found["n_eval_prompts"]))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The paper's central claims on the toy world (issue 17).")
    p.add_argument("what", choices=("multistyle", "drift", "analyse", "resolved"))
    p.add_argument("paths", nargs="*", help="analyse: the root of the runs; resolved: experiment results.json files")
    p.add_argument("--mode", choices=MODES, default="named")
    p.add_argument("--model", default=str(TOY_BASE))
    p.add_argument("--teacher", default="models/toy-teacher-stripes")
    p.add_argument("--checker", default="models/toy-checker")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=300, help="drift: checkpoint (and score) every N steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--only", nargs="+", default=[])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default="runs/claims")
    p.add_argument("--out", default=None, help="analyse / resolved: also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = Path(a.root)
    if a.what == "multistyle":
        run_multistyle(a.mode, model=a.model, checker=a.checker, seeds=a.seeds, steps=a.steps, lr=a.lr,
                       batch_size=a.batch_size, n_eval=a.n_eval, root=root, only=a.only)
    elif a.what == "drift":
        run_drift(model=a.model, teacher=a.teacher, checker=a.checker, seeds=a.seeds, steps=a.steps, every=a.every,
                  lr=a.lr, batch_size=a.batch_size, n_eval=a.n_eval, root=root, only=a.only)
    elif a.what == "analyse":
        report = analyse(Path(a.paths[0]) if a.paths else root, Path(a.out) if a.out else None)
        print(json.dumps({**report.get("multistyle", {}).get("comparisons", {}),
                          **report.get("drift_comparisons", {})}, indent=1))
    else:
        if not a.paths:
            p.error("resolved needs experiment results.json files, e.g. docs/results/*.json")
        found = resolved_differences(a.paths)
        if a.out:
            Path(a.out).write_text(json.dumps(found, indent=1) + "\n")
        for f in found:
            if f["resolved_unadjusted"]:
                print(f"{f['file']}: {f['variant']} - {f['reference']}: {f['metric']} {f['mean']:+.3f} "
                      f"(±{f['ci95']:.3f}, {f['same_sign_seeds']}/{f['n_seeds']} seeds same sign, p {f['p']:.3f}, "
                      f"Holm {f['p_holm']:.3f})")


if __name__ == "__main__":
    main()
