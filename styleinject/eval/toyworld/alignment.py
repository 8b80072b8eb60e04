"""Prompt alignment of a toy-world text-to-image model (base, or base + adapter).

For held-out scenes of world ``PROMPT_SEED`` the model draws each caption once per sampling seed;
the attribute checker reads shape, colour and count off every image and the toy CLIP gives a
CLIPScore. Per seed: accuracy over the prompts; reported: mean and 95% confidence interval over
the seeds (t distribution, ``styleinject.eval.runner.mean_ci``), plus references: the checker on the
rendered scenes themselves, on their VAE round trip (the ceiling for generated images) and chance. ``style`` is the fraction of images the checker
reads as the target style (``--style``; "none" for the base model). ``style_dist`` is the style
strength as a distance: the mean L2 distance between low-order statistics of each image (``style_stats``)
and those of the same scene rendered in the target style (lower is closer to the style).

    python -m styleinject.eval.toyworld.alignment --model styleinject/assets/toy-base --out runs/toy-base-alignment
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from styleinject.assets import TOY_BASE

from ..runner import mean_ci
from .checker import CHANCE, correct, load_checker
from .render import caption, render, scene_at
from .styles import apply_style

PROMPT_SEED = 2


def grid(images: list[Image.Image], cols: int, scale: int = 3) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out.resize((cols * w * scale, rows * h * scale), Image.NEAREST)


def style_stats(images) -> np.ndarray:
    """Per image: RGB mean, RGB std and the mean absolute difference along both diagonals and
    both axes, in [0, 1] units: the palette, contrast and texture statistics the styles change."""
    feats = []
    for im in images:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 if isinstance(im, Image.Image) \
            else (im.detach().float().permute(1, 2, 0).numpy() + 1) / 2
        diffs = [np.abs(a[1:, 1:] - a[:-1, :-1]).mean(), np.abs(a[1:, :-1] - a[:-1, 1:]).mean(),
                 np.abs(a[1:] - a[:-1]).mean(), np.abs(a[:, 1:] - a[:, :-1]).mean()]
        feats.append(np.concatenate([a.mean(axis=(0, 1)), a.std(axis=(0, 1)), np.array(diffs)]))
    return np.stack(feats)


def style_distance(images, references) -> float:
    return float(np.linalg.norm(style_stats(images) - style_stats(references), axis=1).mean())


def generate_scenes(pipe, scenes, *, seed: int, steps: int, guidance: float, adapter=None, batch: int = 50,
                    prefix: str = "") -> list[Image.Image]:
    from styleinject.pipeline import generate

    images = []
    for i in range(0, len(scenes), batch):
        prompts = [prefix + caption(s) for s in scenes[i:i + batch]]
        images += generate(pipe, prompts, seed=seed * 100003 + i, steps=steps, guidance_scale=guidance,
                           width=32, height=32, adapter=adapter)
    return images


def evaluate_alignment(model: str, checker: str, clip: str | None = None, *, n: int = 200,
                       seeds=(0, 1, 2), steps: int = 30, guidance: float = 4.0, adapter=None,
                       style: str | None = None, out: str | Path | None = None, prefix: str = "") -> dict:
    from styleinject.pipeline import load_pipeline

    pipe = load_pipeline(model, device="cpu")
    chk = load_checker(checker)
    scorer = None
    if clip:
        from ..scorers import CLIPScorer

        scorer = CLIPScorer(model=clip, device="cpu")
    scenes = [scene_at(PROMPT_SEED, i) for i in range(n)]
    captions = [caption(s) for s in scenes]
    rendered = [apply_style(render(s), style) for s in scenes]
    per_seed: dict[str, list[float]] = {}
    first_images = None
    for seed in seeds:
        images = generate_scenes(pipe, scenes, seed=seed, steps=steps, guidance=guidance, adapter=adapter,
                                 prefix=prefix)
        first_images = first_images or images
        for k, v in correct(chk, images, scenes, style).items():
            per_seed.setdefault(k, []).append(float(np.mean(v)))
        per_seed.setdefault("style_dist", []).append(style_distance(images, rendered))
        if scorer is not None:
            per_seed.setdefault("clipscore", []).append(float(np.mean(scorer.score(images, captions))))
    reference = {k: float(np.mean(v)) for k, v in correct(chk, rendered, scenes, style).items()}
    if scorer is not None:
        reference["clipscore"] = float(np.mean(scorer.score(rendered, captions)))
        shuffled = captions[1:] + captions[:1]
        reference["clipscore_mismatched_captions"] = float(np.mean(scorer.score(rendered, shuffled)))
    # ceiling for generated images: the rendered scenes after a VAE encode/decode round trip
    from .checker import to_tensor

    with torch.no_grad():
        x = to_tensor(rendered)
        vae = pipe.vae
        rt = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    vae_rt = {k: float(np.mean(v)) for k, v in correct(chk, rt, scenes, style).items()}
    vae_rt["style_dist"] = style_distance(list(rt), rendered)
    reference["style_dist"] = 0.0
    reference["style_dist_unstyled"] = style_distance([render(s) for s in scenes], rendered)
    report = {"vae_roundtrip_reference": vae_rt, "model": str(model), "adapter": str(adapter) if adapter else None, "n_prompts": n,
              "seeds": list(seeds), "style": style, "steps": steps, "guidance": guidance, "prompt_world_seed": PROMPT_SEED,
              "per_seed": per_seed, "summary": {k: mean_ci(v) for k, v in per_seed.items()},
              "rendered_reference": reference, "chance": CHANCE}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "alignment.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        k = min(24, n)
        grid(rendered[:k] + first_images[:k], cols=k // 2 if k >= 12 else k).save(out / "grid.png")
        (out / "grid_captions.txt").write_text(
            f"rows 1-2: rendered references; rows 3-4: generated (seed {seeds[0]})\n"
            + "\n".join(captions[:k]) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Attribute accuracy / CLIPScore of a toy-world model.")
    p.add_argument("--model", default=str(TOY_BASE))
    p.add_argument("--checker", default="models/toy-checker")
    p.add_argument("--clip", default="models/toy-clip")
    p.add_argument("--adapter", default=None)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--style", default=None, help="target style of the adapter (for the style accuracy)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/toy-base-alignment")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    r = evaluate_alignment(a.model, a.checker, a.clip or None, n=a.n, seeds=a.seeds, steps=a.steps,
                           guidance=a.guidance, adapter=a.adapter, style=a.style, out=a.out)
    for k, s in r["summary"].items():
        ci = f" +- {s['ci95']:.3f}" if s["ci95"] is not None else ""
        print(f"{k:10s} {s['mean']:.3f}{ci}  (rendered {r['rendered_reference'].get(k, float('nan')):.3f}, "
              f"VAE round trip {r['vae_roundtrip_reference'].get(k, float('nan')):.3f}, "
              f"chance {r['chance'].get(k, float('nan')):.3f})")
    print(f"wrote {a.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
