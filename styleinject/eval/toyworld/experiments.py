"""Toy-world experiments: one command each, every number measured by the code below.

    python -m styleinject.eval.toyworld.experiments equal-params --style stripes
    python -m styleinject.eval.toyworld.experiments ablation --style stripes
    python -m styleinject.eval.toyworld.experiments n-sweep --style stripes
    python -m styleinject.eval.toyworld.experiments distill --style stripes   # needs models/toy-teacher-stripes

Each run fine-tunes an adapter on the toy base (``styleinject.train.run_training``, kind finetune)
with a styled toy dataset (``dataset.write_dataset``, world seed ``DATA_SEED``), then scores it with
``alignment.evaluate_alignment``: style accuracy (the checker reads the target style), attribute
accuracy (shape, colour, count all as prompted) and toy CLIPScore, on held-out prompts. Every
variant runs with training seeds 0, 1, 2 (``--seeds``); tables give mean +- 95% CI over the seeds.
Results: ``runs/experiments/<experiment>-<style>/results.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from styleinject import StyleInjectConfig, count_parameters, inject

from ..runner import mean_ci
from .alignment import evaluate_alignment
from .dataset import SCENES_FILE, write_dataset

DATA_SEED = 3
TARGETS = ["to_q", "to_v"]


def adapter_params(model: str, cfg: StyleInjectConfig) -> int:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    return count_parameters(inject(unet, copy.deepcopy(cfg)))


def lora_matching(model: str, cfg: StyleInjectConfig, convs=()) -> StyleInjectConfig:
    """The LoRA (same targets) whose parameter count is closest to ``cfg``'s."""
    target = adapter_params(model, cfg)
    # LoRA's count is linear in the rank: one evaluation gives every rank
    per_rank = adapter_params(model, StyleInjectConfig.lora(rank=1, target_modules=TARGETS,
                                                            conv_target_modules=list(convs)))
    best = min(range(1, 513), key=lambda r: abs(per_rank * r - target))
    return StyleInjectConfig.lora(rank=best, alpha=best, target_modules=TARGETS)


def variants(experiment: str, model: str) -> dict[str, StyleInjectConfig]:
    paper = StyleInjectConfig()  # r = 32, n = 16, alpha = r, DMA+STA on to_q, low rank on to_v
    if experiment == "equal-params":
        return {"styleinject r32 n16 (paper)": paper,
                "lora r32 (paper rank)": StyleInjectConfig.lora(rank=32, target_modules=TARGETS),
                "lora, params = styleinject": lora_matching(model, paper)}
    if experiment == "ablation":
        return {"DMA+STA": paper, "DMA only": StyleInjectConfig(sta=False),
                "STA only (n=1)": StyleInjectConfig(num_styles=1), "neither (= LoRA r32)":
                StyleInjectConfig.lora(rank=32, target_modules=TARGETS)}
    if experiment == "n-sweep":
        return {f"n={n}": StyleInjectConfig(num_styles=n) for n in (1, 4, 16)}
    if experiment == "distill":  # the paper also adapts the resnet convolutions for distillation
        convs = ["conv1", "conv2"]
        si = StyleInjectConfig(conv_target_modules=convs)
        r = lora_matching(model, si, convs).rank
        return {"styleinject r32 n16 + convs (paper)": si,
                "lora r32 + convs": StyleInjectConfig.lora(rank=32, target_modules=TARGETS, conv_target_modules=convs),
                "lora + convs, params = styleinject": StyleInjectConfig.lora(rank=r, alpha=r, target_modules=TARGETS,
                                                                              conv_target_modules=convs)}
    raise ValueError(f"unknown experiment {experiment!r}")


def run(experiment: str, *, model: str, checker: str, clip: str, style: str, seeds, steps: int,
        lr: float, batch_size: int, n_eval: int, root: Path, teacher: str | None = None, only=(), log=print) -> dict:
    from styleinject.train import TrainConfig, run_training

    out = root / f"{experiment}-{style}"
    data = root / f"data-{style}"
    if not (data / SCENES_FILE).exists():  # shared by the experiments of one style
        write_dataset(data, 1000, seed=DATA_SEED, style=style)
    rows = []
    chosen = {k: v for k, v in variants(experiment, model).items()
              if not only or any(o.lower() in k.lower() for o in only)}
    for name, cfg in chosen.items():
        n_params = adapter_params(model, cfg)
        for seed in seeds:
            run_dir = out / name.replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "").replace(",", "") \
                / f"seed{seed}"
            t0 = time.time()
            result = run_training(TrainConfig(
                kind="distill" if experiment == "distill" else "finetune", base_model=model,
                teacher_model=(teacher or f"models/toy-teacher-{style}") if experiment == "distill" else None, data=str(data), output_dir=str(run_dir), steps=steps,
                resolution=32, batch_size=batch_size, learning_rate=lr, seed=seed, checkpoint_every=0,
                adapter=copy.deepcopy(cfg)))
            train_s = time.time() - t0
            rep = evaluate_alignment(model, checker, clip, n=n_eval, seeds=(seed,), adapter=str(run_dir),
                                     style=style, out=run_dir / "eval")
            row = {"variant": name, "seed": seed, "params": n_params, "final_loss": result.loss,
                   "train_s": round(train_s, 1), **{k: v[0] for k, v in rep["per_seed"].items()}}
            rows.append(row)
            log(json.dumps(row))
    base = evaluate_alignment(model, checker, clip, n=n_eval, seeds=tuple(seeds), style=style, out=out / "base")
    teacher_summary = None
    if experiment == "distill":
        teacher_summary = evaluate_alignment(teacher or f"models/toy-teacher-{style}", checker, clip, n=n_eval,
                                             seeds=tuple(seeds), style=style, out=out / "teacher")["summary"]
    table = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        table[name] = {"params": mine[0]["params"],
                       **{k: mean_ci([r[k] for r in mine]) for k in ("style", "all", "clipscore", "final_loss")}}
    results = {"experiment": experiment, "style": style, "steps": steps, "lr": lr, "batch_size": batch_size,
               "seeds": list(seeds), "n_eval_prompts": n_eval, "rows": rows, "table": table,
               "base_model_no_adapter": base["summary"], "teacher": teacher_summary,
               "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(results))
    return results


def _fmt(s: dict, digits: int = 3) -> str:
    if s["ci95"] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['ci95']:.{digits}f}"


def markdown_table(results: dict) -> str:
    lines = [(f"{results['experiment']}, style `{results['style']}`: {results['steps']} steps, lr {results['lr']}, "
             f"batch {results['batch_size']}, seeds {results['seeds']}, {results['n_eval_prompts']} held-out prompts "
             "per seed; mean ± 95% CI over seeds."), "",
             "| variant | params | style acc | attribute acc (all) | toy CLIPScore | final loss |",
             "|---|---|---|---|---|---|"]
    for name, t in results["table"].items():
        lines.append(f"| {name} | {t['params']:,} | {_fmt(t['style'])} | {_fmt(t['all'])} | "
                     f"{_fmt(t['clipscore'], 1)} | {_fmt(t['final_loss'], 4)} |")
    if results.get("teacher"):
        t = results["teacher"]
        lines.append(f"| teacher (every UNet weight fine-tuned) | all | {_fmt(t['style'])} | {_fmt(t['all'])} | "
                     f"{_fmt(t['clipscore'], 1)} | |")
    b = results["base_model_no_adapter"]
    lines.append(f"| base model, no adapter | 0 | {_fmt(b['style'])} | {_fmt(b['all'])} | {_fmt(b['clipscore'], 1)} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Toy-world StyleInject vs LoRA experiments.")
    p.add_argument("experiment", choices=("equal-params", "ablation", "n-sweep", "distill"))
    p.add_argument("--only", nargs="+", default=[], help="run only the variants whose name contains one of these")
    p.add_argument("--teacher", default=None, help="distill: teacher pipeline (default models/toy-teacher-STYLE)")
    p.add_argument("--style", default="stripes")
    p.add_argument("--model", default="models/toy-base")
    p.add_argument("--checker", default="models/toy-checker")
    p.add_argument("--clip", default="models/toy-clip")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default="runs/experiments")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = run(a.experiment, model=a.model, checker=a.checker, clip=a.clip, style=a.style, seeds=a.seeds,
            steps=a.steps, lr=a.lr, batch_size=a.batch_size, n_eval=a.n_eval, root=Path(a.root),
            teacher=a.teacher, only=a.only)
    print(markdown_table(r))


if __name__ == "__main__":
    main()
