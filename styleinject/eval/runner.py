"""Generate the prompt suite with a base model (optionally + an adapter) and score every sample.

`evaluate_adapter` writes, when given an output folder:
  report.json   settings, scorer conventions, every sample, and the summary below
  report.csv    one row per (prompt, seed) sample with one column per scorer
  summary.csv   mean +- 95% CI per scorer, overall and per category
  images/       <prompt id>-s<seed>.png, with save_images=True

Confidence intervals treat the prompt as the unit: the seeds of one prompt are averaged first
(they share the prompt, so they are not independent draws), then
mean +- t_{0.975, n-1} * sd / sqrt(n) over the n prompt means (Student t).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from styleinject.eval.prompts import DEFAULT_SEEDS, Prompt, as_prompts, load_prompts
from styleinject.eval.scorers import Scorer, get_scorer
from styleinject.names import SCORER_PATH_KEYS  # keys of `scorer_paths`: a hub id or folder per model

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30; beyond, a Cornish-Fisher expansion.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010,
         2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739,
         2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """t_{0.975} with `df` degrees of freedom (exact table to 30, then accurate to ~1e-4)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample sd and the 95% t interval half-width of `values` (None when n < 2)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None, "ci_low": None, "ci_high": None}
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None, "ci_low": None, "ci_high": None}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": half, "ci_low": mean - half, "ci_high": mean + half}


def summarize(samples: Sequence[Mapping[str, Any]], scorer_names: Sequence[str]) -> dict[str, Any]:
    """Per scorer, overall and per category: mean +- 95% CI over prompt means (see module doc)."""

    def stats(rows: list[Mapping[str, Any]], name: str) -> dict[str, Any]:
        by_prompt: dict[str, list[float]] = {}
        for row in rows:
            by_prompt.setdefault(row["prompt_id"], []).append(float(row[name]))
        prompt_means = [math.fsum(v) / len(v) for v in by_prompt.values()]
        result = mean_ci(prompt_means)
        result["n_prompts"] = result.pop("n")
        result["n_samples"] = len(rows)
        return result

    categories = list(dict.fromkeys(row["category"] for row in samples))
    return {
        "overall": {name: stats(list(samples), name) for name in scorer_names},
        "by_category": {
            category: {name: stats([r for r in samples if r["category"] == category], name) for name in scorer_names}
            for category in categories
        },
    }


def build_scorers(
    scorers: Iterable[str | Scorer],
    scorer_paths: Mapping[str, str | Path | None] | None = None,
    *,
    device: Any = None,
    batch_size: int = 16,
) -> list[Scorer]:
    """Scorer objects from names (using `scorer_paths` for weights) or ready Scorer instances."""
    paths = {k: v for k, v in (scorer_paths or {}).items() if v is not None}
    unknown = sorted(set(paths) - set(SCORER_PATH_KEYS))
    if unknown:
        raise ValueError(f"unknown scorer_paths keys {unknown}; valid keys: {', '.join(SCORER_PATH_KEYS)}")
    built: list[Scorer] = []
    for item in scorers:
        if isinstance(item, Scorer):
            built.append(item)
            continue
        name = str(item).lower()
        processor_key = "imagereward_tokenizer" if name == "imagereward" else f"{name}_processor"
        model, processor = paths.get(name), paths.get(processor_key)
        built.append(get_scorer(name, None if model is None else str(model),
                                None if processor is None else str(processor),
                                device=device, batch_size=batch_size))
    names = [s.name for s in built]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"give each scorer once, at least one (got {names})")
    return built


def _normalise_prompts(prompts: Any) -> list[Prompt]:
    if prompts is None:
        return load_prompts()
    if isinstance(prompts, (str, Path)):
        return load_prompts(prompts)
    prompts = as_prompts(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate")
    return prompts


def _file_stems(prompt_ids: Sequence[str]) -> dict[str, str]:
    """Safe, unique file names for prompt ids (ids of user prompt files may hold any character)."""
    stems: dict[str, str] = {}
    for index, prompt_id in enumerate(prompt_ids):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", prompt_id).strip("._")[:80] or "prompt"
        stems[prompt_id] = stem if stem not in stems.values() else f"{stem}-{index}"
    return stems


def evaluate_adapter(
    base_model: str | Path | None,
    adapter_dir: str | Path | None = None,
    *,
    prompts: Sequence[Prompt | str | dict] | str | Path | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    steps: int | None = None,
    guidance_scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    negative_prompt: str | None = None,
    adapter_scale: float = 1.0,
    scorers: Iterable[str | Scorer] = ("clipscore",),
    scorer_paths: Mapping[str, str | Path | None] | None = None,
    output_dir: str | Path | None = None,
    save_images: bool = False,
    device: Any = None,
    dtype: Any = None,
    batch_size: int = 16,
    pipeline: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Generate every (prompt, seed) sample with Euler Ancestral sampling and score it.

    base_model: diffusers pipeline (hub id or local folder), ignored when `pipeline` is given (an
    already loaded `styleinject.pipeline.load_pipeline` result, e.g. one kept resident by a worker).
    adapter_dir: adapter folder, or None for the base model alone.
    prompts: None (the packaged 198-prompt suite), a prompt file, or a list of Prompt/str/dict.
    scorers: names ("clipscore", "pickscore", "imagereward") or Scorer instances; weights come from
    `scorer_paths` (keys SCORER_PATH_KEYS, values hub ids or local folders; missing = defaults).
    steps, guidance_scale, width, height: None takes the model's (``pipeline.generation_defaults``).
    progress(done, total) is called after each generated sample. Returns the report (also report.json).
    """
    from styleinject.pipeline import generate, generation_defaults, load_pipeline

    prompt_list = _normalise_prompts(prompts)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers (got {seeds})")
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter_dir}")
    out = Path(output_dir) if output_dir is not None else None
    if save_images and out is None:
        raise ValueError("save_images needs an output_dir")

    # 1. load everything up front, scorers first: a missing weight fails before any generation
    if pipeline is None and base_model is None:
        raise ValueError("give base_model or pipeline")
    scorer_device = device if device is not None or pipeline is None else getattr(pipeline, "device", None)
    scorer_list = [s.load() for s in build_scorers(scorers, scorer_paths, device=scorer_device, batch_size=batch_size)]
    names = [s.name for s in scorer_list]
    if pipeline is None:
        pipeline = load_pipeline(base_model, device=device, dtype=dtype)
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    defaults = generation_defaults(pipeline)  # unset options: the model's (recorded in the report)
    steps = defaults["steps"] if steps is None else steps
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    width = defaults["width"] if width is None else width
    height = defaults["height"] if height is None else height
    if out is not None:
        (out / "images" if save_images else out).mkdir(parents=True, exist_ok=True)

    # 2. generate and score, one prompt (all its seeds) at a time to bound memory
    file_stems = _file_stems([p.id for p in prompt_list])
    total, done = len(prompt_list) * len(seeds), 0
    samples: list[dict[str, Any]] = []
    generation_s = scoring_s = 0.0
    for prompt in prompt_list:
        started = time.perf_counter()
        images = []
        for seed in seeds:
            images.append(generate(pipeline, prompt.text, negative_prompt=negative_prompt, seed=seed, steps=steps,
                                   guidance_scale=guidance_scale, width=width, height=height, num_images=1,
                                   adapter=None if adapter_dir is None else str(adapter_dir),
                                   adapter_scale=adapter_scale)[0])
            done += 1
            if progress is not None:
                progress(done, total)
        generation_s += time.perf_counter() - started
        started = time.perf_counter()
        scores = {s.name: s.score(images, [prompt.text] * len(images)) for s in scorer_list}
        scoring_s += time.perf_counter() - started
        for index, (seed, image) in enumerate(zip(seeds, images)):
            row: dict[str, Any] = {"prompt_id": prompt.id, "category": prompt.category, "prompt": prompt.text,
                                   "seed": seed, "image": None}
            if save_images:
                row["image"] = f"images/{file_stems[prompt.id]}-s{seed}.png"
                image.save(out / row["image"])
            row.update({name: scores[name][index] for name in names})
            samples.append(row)

    # 3. aggregate and write
    report = {
        "format": "styleinject-eval/1",
        "base_model": str(base_model) if base_model is not None else getattr(pipeline, "name_or_path", None),
        "adapter": None if adapter_dir is None else str(adapter_dir),
        "settings": {
            "seeds": seeds, "steps": steps, "guidance_scale": guidance_scale, "width": width, "height": height,
            "negative_prompt": negative_prompt, "adapter_scale": adapter_scale,
            "scheduler": type(pipeline.scheduler).__name__ if hasattr(pipeline, "scheduler") else None,
            "num_prompts": len(prompt_list), "num_samples": len(samples),
            "ci": "95% Student t interval over per-prompt means (seeds averaged within a prompt)",
        },
        "scorers": {s.name: s.describe() for s in scorer_list},
        "summary": summarize(samples, names),
        "samples": samples,
        "timing_s": {"generation": round(generation_s, 3), "scoring": round(scoring_s, 3)},
    }
    if out is not None:
        write_report(report, out)
    return report


def write_report(report: Mapping[str, Any], output_dir: str | Path) -> None:
    """report.json, report.csv (per sample) and summary.csv (aggregates) in `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(report["scorers"])
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    with (out / "report.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt_id", "category", "seed", "prompt", "image", *names])
        for row in report["samples"]:
            writer.writerow([row["prompt_id"], row["category"], row["seed"], row["prompt"], row["image"] or "",
                             *(f"{row[name]:.6f}" for name in names)])
    fields = ["n_prompts", "n_samples", "mean", "std", "ci95", "ci_low", "ci_high"]
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", "scorer", *fields])
        scopes = [("overall", report["summary"]["overall"]), *report["summary"]["by_category"].items()]
        for category, per_scorer in scopes:
            for name in names:
                stats = per_scorer[name]
                writer.writerow([category, name, *("" if stats[f] is None else
                                                   (f"{stats[f]:.6f}" if isinstance(stats[f], float) else stats[f])
                                                   for f in fields)])
