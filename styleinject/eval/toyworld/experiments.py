"""Toy-world experiments: one command each, every number measured by the code below.

    python -m styleinject.eval.toyworld.experiments equal-params --style stripes
    python -m styleinject.eval.toyworld.experiments ablation --style pastel
    python -m styleinject.eval.toyworld.experiments n-sweep --style pastel
    python -m styleinject.eval.toyworld.experiments distill --style stripes   # needs models/toy-teacher-stripes
    python -m styleinject.eval.toyworld.experiments long --style stripes --steps 2400 --curve-every 600

Each run fine-tunes an adapter on the toy base (``styleinject.train.run_training``, kind finetune)
with a styled toy dataset (``dataset.write_dataset``, world seed ``DATA_SEED``), then scores it with
``alignment.evaluate_alignment``: style accuracy (the checker reads the target style), style
distance (image statistics against the styled reference), attribute accuracy (shape, colour, count
all as prompted) and toy CLIPScore, on held-out prompts. Every variant runs with training seeds
0, 1, 2 (``--seeds``); tables give mean +- 95% CI over the seeds. ``--convs`` also adapts the resnet
convolutions (conv1, conv2) in every variant. ``long`` scores a checkpoint every ``--curve-every``
steps, for the alignment-over-training curve (the paper's Fig. 10).

Every run also records its mechanism shares (``styleinject.eval.mechanism``: how much of the
adapter's effect STA, the router, the styled / plain and the linear / conv layers carry);
``shares ADAPTER_DIR...`` prints them for any adapter folder.

A run is cached under ``<root>/cache/<key>`` (the key hashes everything that defines it), so
experiments that share a variant (the paper's StyleInject is in most of them) train it once, and an
interrupted experiment picks up where it stopped.
Results: ``<root>/<experiment>-<style>[-convs]/results.json`` and ``table.md``; ``table RESULTS_JSON``
reprints the tables of a saved results.json (after a change to the table format, for example).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from styleinject import StyleInjectConfig, count_parameters, inject

from styleinject.assets import TOY_BASE

from ..mechanism import PARTS, mechanism_shares, record_unet_inputs
from ..runner import mean_ci
from .alignment import PROMPT_SEED, evaluate_alignment
from .dataset import SCENES_FILE, write_dataset
from .render import caption, scene_at

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
    return StyleInjectConfig.lora(rank=best, alpha=best, target_modules=TARGETS, conv_target_modules=list(convs))


CONVS = ["conv1", "conv2"]

# mechanism shares: 20 held-out prompts, sampling seed 0, four of the 30 sampling steps
SHARE_PROMPTS, SHARE_SEEDS, SHARE_AT_STEPS = 20, (0,), (0, 10, 20, 29)
_share_inputs: dict[str, tuple] = {}


def adapter_shares(model: str, adapter_dir: str | Path) -> dict:
    """``mechanism_shares`` of a trained adapter folder on the base model's own sampling inputs
    (held-out prompts of world ``PROMPT_SEED``, 30 steps, guidance 4, as ``evaluate_alignment``)."""
    from styleinject.adapters import delete_adapter, load_adapter
    from styleinject.pipeline import load_pipeline

    if model not in _share_inputs:  # one pipeline and one recording per base model and process
        pipe = load_pipeline(model, device="cpu")
        prompts = [caption(scene_at(PROMPT_SEED, i)) for i in range(SHARE_PROMPTS)]
        _share_inputs[model] = (pipe, record_unet_inputs(pipe, prompts, seeds=SHARE_SEEDS, steps=30, guidance=4.0,
                                                         at_steps=SHARE_AT_STEPS, width=32, height=32))
    pipe, inputs = _share_inputs[model]
    load_adapter(pipe.unet, adapter_dir, "shares")
    try:
        return mechanism_shares(pipe.unet, inputs, "shares")
    finally:
        delete_adapter(pipe.unet, "shares")


def variants(experiment: str, model: str, convs: bool = False) -> dict[str, StyleInjectConfig]:
    conv = CONVS if convs or experiment == "distill" else []
    tag = " + convs" if conv else ""

    def si(**kw):
        return StyleInjectConfig(conv_target_modules=list(conv), **kw)

    def lora(rank):
        return StyleInjectConfig.lora(rank=rank, alpha=rank, target_modules=TARGETS, conv_target_modules=conv)

    paper = si()  # r = 32, n = 16, alpha = r, DMA+STA on to_q, low rank on to_v
    matched = lora_matching(model, paper, conv)
    if experiment in ("equal-params", "distill", "long"):
        out = {f"styleinject r32 n16{tag} (paper)": paper, f"lora r32{tag} (paper rank)": lora(32),
               f"lora{tag}, params = styleinject": matched}
        if experiment in ("equal-params", "long"):  # long: the paper's drift claim is about this LoRA
            out[f"lora r512{tag} (paper's LoRA)"] = lora(512)
        return out
    if experiment == "ablation":
        return {f"DMA+STA{tag}": paper, f"DMA only{tag}": si(sta=False),
                f"STA only (n=1){tag}": si(num_styles=1), f"neither (= LoRA r32){tag}": lora(32)}
    if experiment == "n-sweep":
        return {f"n={n}{tag}": si(num_styles=n) for n in (1, 4, 8, 16)}
    raise ValueError(f"unknown experiment {experiment!r}")


def run_key(**spec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def run(experiment: str, *, model: str, checker: str, clip: str, style: str, seeds, steps: int,
        lr: float, batch_size: int, n_eval: int, root: Path, teacher: str | None = None, only=(),
        convs: bool = False, curve_every: int = 0, log=print) -> dict:
    from styleinject.train import TrainConfig, run_training

    name_of_out = f"{experiment}-{style}" + ("-convs" if convs and experiment != "distill" else "")
    out = root / name_of_out
    data = root / f"data-{style}"
    if not (data / SCENES_FILE).exists():  # shared by the experiments of one style
        write_dataset(data, 1000, seed=DATA_SEED, style=style)
    kind = "distill" if experiment == "distill" else "finetune"
    teacher = (teacher or f"models/toy-teacher-{style}") if kind == "distill" else None
    curve_every = curve_every if experiment == "long" else 0
    rows = []
    chosen = {k: v for k, v in variants(experiment, model, convs).items()
              if not only or any(o.lower() in k.lower() for o in only)}
    for name, cfg in chosen.items():
        n_params = adapter_params(model, cfg)
        for seed in seeds:
            key = run_key(kind=kind, model=model, teacher=teacher, style=style, data_seed=DATA_SEED,
                          adapter=cfg.to_dict(), steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                          n_eval=n_eval, curve_every=curve_every)
            run_dir = root / "cache" / key
            done = run_dir / "row.json"
            if done.exists():
                row = json.loads(done.read_text())
                if "shares" not in row and (run_dir / "adapter_config.json").exists():  # a run from before shares
                    row["shares"] = adapter_shares(model, run_dir)
                    done.write_text(json.dumps(row, indent=2) + "\n")
                rows.append({**row, "variant": name})
                log(f"cached: {name} seed {seed} ({run_dir})")
                continue
            t0 = time.time()
            result = run_training(TrainConfig(
                kind=kind, base_model=model, teacher_model=teacher, data=str(data), output_dir=str(run_dir),
                steps=steps, resolution=32, batch_size=batch_size, learning_rate=lr, seed=seed,
                checkpoint_every=curve_every, keep_checkpoints=0, resume="latest" if (run_dir / "checkpoints").exists() else None,
                adapter=copy.deepcopy(cfg)))
            train_s = time.time() - t0
            rep = evaluate_alignment(model, checker, clip, n=n_eval, seeds=(seed,), adapter=str(run_dir),
                                     style=style, out=run_dir / "eval")
            row = {"variant": name, "seed": seed, "params": n_params, "final_loss": result.loss,
                   "train_s": round(train_s, 1), "run": key, **{k: v[0] for k, v in rep["per_seed"].items()},
                   "shares": adapter_shares(model, run_dir)}
            if curve_every:
                row["curve"] = []
                for ck in result.checkpoints:
                    step = int(ck.name.split("-")[1])
                    r = rep if step == steps else evaluate_alignment(
                        model, checker, clip, n=n_eval, seeds=(seed,), adapter=str(ck), style=style)
                    row["curve"].append({"step": step, **{k: v[0] for k, v in r["per_seed"].items()}})
            done.write_text(json.dumps(row, indent=2) + "\n")
            rows.append(row)
            log(json.dumps({k: v for k, v in row.items() if k != "curve"}))
    base = evaluate_alignment(model, checker, clip, n=n_eval, seeds=tuple(seeds), style=style, out=out / "base")
    teacher_summary = None
    if teacher:
        teacher_summary = evaluate_alignment(teacher, checker, clip, n=n_eval, seeds=tuple(seeds), style=style,
                                             out=out / "teacher")["summary"]
    table = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        table[name] = {"params": mine[0]["params"],
                       **{k: mean_ci([r[k] for r in mine]) for k in METRICS},
                       "train_s": mean_ci([r["train_s"] for r in mine])}
        if all("shares" in r for r in mine):
            table[name]["shares"] = {part: mean_ci([r["shares"]["shares"][part] for r in mine])
                                     for part in PARTS if mine[0]["shares"]["shares"][part] is not None}
        if curve_every:
            steps_seen = sorted({c["step"] for r in mine for c in r["curve"]})
            table[name]["curve"] = [
                {"step": st, **{k: mean_ci([c[k] for r in mine for c in r["curve"] if c["step"] == st])
                                for k in METRICS if k != "final_loss"}} for st in steps_seen]
    results = {"experiment": experiment, "style": style, "convs": convs or experiment == "distill",
               "steps": steps, "lr": lr, "batch_size": batch_size, "seeds": list(seeds),
               "n_eval_prompts": n_eval, "rows": rows, "table": table,
               "base_model_no_adapter": base["summary"], "teacher": teacher_summary,
               "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(results))
    if curve_every:
        from .plot import curve_plot

        curve_plot(results, out / "curve.png")
    return results


METRICS = ("style", "style_dist", "all", "clipscore", "final_loss")


def paired_differences(rows: list[dict], metrics=("style", "style_dist", "all", "clipscore")) -> dict:
    """Per variant, mean_ci of (variant - first variant) over the seeds both ran.

    Seeds vary far more than variants here (a seed fixes the data order, the noise and the sampling
    seeds for every variant alike), so pairing by seed removes the shared part of that variation.
    """
    by_variant: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    if len(by_variant) < 2:
        return {}
    ref_name, ref = next(iter(by_variant.items()))
    out = {}
    for name, mine in by_variant.items():
        seeds = sorted(set(mine) & set(ref))
        if name == ref_name or not seeds:
            continue
        out[name] = {k: mean_ci([mine[s][k] - ref[s][k] for s in seeds]) for k in metrics
                     if all(k in r for r in rows)}
    return out


def _fmt(s: dict | None, digits: int = 3) -> str:
    if s is None or s["mean"] is None:  # a metric an older results.json lacks
        return ""
    if s["ci95"] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['ci95']:.{digits}f}"


def markdown_table(results: dict) -> str:
    lines = [(f"{results['experiment']}, style `{results['style']}`{' (convs adapted)' if results.get('convs') else ''}: "
              f"{results['steps']} steps, lr {results['lr']}, "
             f"batch {results['batch_size']}, seeds {results['seeds']}, {results['n_eval_prompts']} held-out prompts "
             "per seed; mean ± 95% CI over seeds."), "",
             "| variant | params | style acc | style dist | attribute acc (all) | toy CLIPScore | final loss | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, t in results["table"].items():
        lines.append(f"| {name} | {t['params']:,} | {_fmt(t['style'])} | {_fmt(t.get('style_dist'))} | {_fmt(t['all'])} | "
                     f"{_fmt(t['clipscore'], 1)} | {_fmt(t['final_loss'], 4)} | {_fmt(t.get('train_s'), 0)} |")
    if results.get("teacher"):
        t = results["teacher"]
        lines.append(f"| teacher (every UNet weight fine-tuned) | all | {_fmt(t['style'])} | {_fmt(t.get('style_dist'))} | "
                     f"{_fmt(t['all'])} | {_fmt(t['clipscore'], 1)} | | |")
    b = results["base_model_no_adapter"]
    lines.append(f"| base model, no adapter | 0 | {_fmt(b['style'])} | {_fmt(b.get('style_dist'))} | {_fmt(b['all'])} | "
                 f"{_fmt(b['clipscore'], 1)} | | |")
    paired = paired_differences(results["rows"])
    if paired:
        ref = next(iter(results["table"]))
        lines += ["", f"Paired differences against **{ref}** (variant minus reference, per training seed: the "
                  "same seed gives both the same data order, noise and sampling seeds; mean ± 95% CI over seeds; "
                  "an interval that excludes 0 is a difference this experiment resolves):", "",
                  "| variant | Δ style acc | Δ style dist | Δ attribute acc (all) | Δ toy CLIPScore |", "|---|---|---|---|---|"]
        for name, d in paired.items():
            lines.append(f"| {name} | {_fmt(d['style'])} | {_fmt(d.get('style_dist'))} | {_fmt(d['all'])} | "
                         f"{_fmt(d['clipscore'], 1)} |")
    shares = {n: t["shares"] for n, t in results["table"].items() if t.get("shares")}
    if shares:
        lines += ["", "Mechanism shares (`styleinject.eval.mechanism`): the fraction of each adapter's effect on "
                  "the predicted noise that goes away when one part is removed (mean ± 95% CI over seeds; "
                  "blank: the adapter has no such part). A part under 10% is **not exercised**: a comparison "
                  "that rests on it tests little.", "",
                  "| variant | " + " | ".join(PARTS) + " |", "|---" * (len(PARTS) + 1) + "|"]
        for name, sh in shares.items():
            cells = [(_fmt(sh[p]) + ("" if sh[p]["mean"] >= 0.1 else " (not exercised)")) if p in sh else ""
                     for p in PARTS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    curves = {n: t["curve"] for n, t in results["table"].items() if t.get("curve")}
    if curves:
        lines += ["", "Over training (attribute acc all / style acc / toy CLIPScore):", "",
                  "| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
        for i, point in enumerate(next(iter(curves.values()))):
            cells = [f"{_fmt(c[i]['all'])} / {_fmt(c[i]['style'])} / {_fmt(c[i]['clipscore'], 1)}"
                     for c in curves.values()]
            lines.append(f"| {point['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Toy-world StyleInject vs LoRA experiments.")
    p.add_argument("experiment", choices=("equal-params", "ablation", "n-sweep", "distill", "long", "table", "shares"),
                   help="the experiment to run; 'table' reprints the tables of an earlier results.json; "
                        "'shares' prints the mechanism shares of trained adapter folders (JSON)")
    p.add_argument("results", nargs="*", help="table: the results.json an experiment wrote; shares: adapter folders")
    p.add_argument("--convs", action="store_true", help="also adapt the resnet conv1/conv2 in every variant")
    p.add_argument("--curve-every", type=int, default=0,
                   help="long: score a checkpoint every N steps (default: steps / 4)")
    p.add_argument("--only", nargs="+", default=[], help="run only the variants whose name contains one of these")
    p.add_argument("--teacher", default=None, help="distill: teacher pipeline (default models/toy-teacher-STYLE)")
    p.add_argument("--style", default="stripes")
    p.add_argument("--model", default=str(TOY_BASE))
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
    if a.experiment == "table":
        if len(a.results) != 1:
            p.error("table needs the results.json to print, e.g. `table docs/results/ablation-stripes-convs.json`")
        try:
            print(markdown_table(json.loads(Path(a.results[0]).read_text())), end="")
        except (OSError, ValueError, KeyError) as e:
            p.error(f"{a.results[0]} is not an experiment's results.json ({e!r})")
        return
    torch.set_num_threads(a.threads)
    if a.experiment == "shares":
        if not a.results:
            p.error("shares needs one or more adapter folders, e.g. `shares runs/experiments/cache/<key>`")
        for folder in a.results:
            print(json.dumps({"adapter": folder, **adapter_shares(a.model, folder)}))
        return
    r = run(a.experiment, model=a.model, checker=a.checker, clip=a.clip, style=a.style, seeds=a.seeds,
            steps=a.steps, lr=a.lr, batch_size=a.batch_size, n_eval=a.n_eval, root=Path(a.root),
            teacher=a.teacher, only=a.only, convs=a.convs,
            curve_every=a.curve_every or (max(1, a.steps // 4) if a.experiment == "long" else 0))
    print(markdown_table(r))


if __name__ == "__main__":
    main()
