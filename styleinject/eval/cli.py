"""`styleinject eval`: generate the prompt suite with a base model (+ adapter) and score it.

Nothing heavy is imported at module level: the library CLI imports this module to build --help.
"""

from __future__ import annotations

from styleinject.names import SCORER_NAMES

SCORER_CHOICES = SCORER_NAMES


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a base model or adapter on the prompt suite (CLIPScore, PickScore, ImageReward)",
        description="Generate every (prompt, seed) of the prompt suite with Euler Ancestral sampling, "
                    "score each image, and write report.json, report.csv (per sample) and summary.csv "
                    "(mean +- 95% CI per category and overall) to --output. Scorer weights are read "
                    "from hub ids or local folders; see docs/evaluation.md.")
    p.add_argument("--base-model", required=True,
                   help="SD 1.x/2.x or SDXL: hub id, diffusers folder or single-file .safetensors")
    p.add_argument("--adapter", default=None, help="adapter folder (default: the base model alone)")
    p.add_argument("--adapter-scale", type=float, default=1.0, help="default: 1.0")
    p.add_argument("--prompts", default=None,
                   help="prompt file (.jsonl with text/category/id, or .txt one a line); default: the "
                        "packaged 198-prompt suite")
    p.add_argument("--categories", nargs="+", default=None, metavar="CATEGORY",
                   help="keep only these categories (default: all)")
    p.add_argument("--per-category", type=int, default=None, metavar="N",
                   help="keep the first N prompts of each category")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="keep the first N prompts overall")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="default: 0 1 2 3")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the model's generation_defaults.json, else 30)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="default: the model's generation_defaults.json, else 7.5")
    p.add_argument("--resolution", type=int, default=None,
                   help="image width and height (default: the model's; 512 for SD 1.5)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--scorer", nargs="+", action="extend", choices=SCORER_CHOICES, dest="scorers",
                   metavar="NAME", help="one or more of clipscore, pickscore, imagereward (default: clipscore)")
    p.add_argument("--clip-model", default=None,
                   help="CLIPScore model: hub id or local folder (default: openai/clip-vit-base-patch32)")
    p.add_argument("--pickscore-model", default=None,
                   help="PickScore model (default: yuvalkirstain/PickScore_v1)")
    p.add_argument("--pickscore-processor", default=None,
                   help="PickScore processor (default: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    p.add_argument("--imagereward-model", default=None,
                   help="folder holding ImageReward.pt and med_config.json, the .pt file itself, or a hub "
                        "id (default: THUDM/ImageReward)")
    p.add_argument("--imagereward-tokenizer", default=None,
                   help="BERT tokenizer for ImageReward (default: bert-base-uncased)")
    p.add_argument("--batch-size", type=int, default=16, help="scorer batch size (default: 16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="generation dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--save-images", action="store_true", help="also write every image to OUTPUT/images/")
    p.add_argument("--output", required=True, help="output folder for the report")
    p.set_defaults(func=run_eval)


def _looks_local(value: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else (absolute, ./, ~, deeper paths) is a path."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value


def _check_path(flag: str, value: str | None, *, kind: str = "folder") -> None:
    from pathlib import Path

    from styleinject.cli import UserError

    if value is None:
        return
    path = Path(value).expanduser()
    if kind == "file" and not path.is_file():
        raise UserError(f"{flag} {value}: no such file")
    if kind != "file" and not path.exists() and _looks_local(value):
        raise UserError(f"{flag} {value}: no such {kind} (give a local {kind} or a hub id)")


def run_eval(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from styleinject.cli import UserError

    _check_path("--base-model", args.base_model)
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {args.adapter}: not an adapter folder (no adapter_config.json)")
    _check_path("--prompts", args.prompts, kind="file")
    for flag in ("clip_model", "pickscore_model", "pickscore_processor", "imagereward_tokenizer"):
        _check_path("--" + flag.replace("_", "-"), getattr(args, flag))
    scorers = list(dict.fromkeys(args.scorers or ["clipscore"]))
    _check_path("--imagereward-model", args.imagereward_model, kind="file or folder")
    if args.resolution is not None and (args.resolution % 8 or args.resolution < 8):
        raise UserError(f"--resolution {args.resolution}: give a multiple of 8")

    import torch

    from styleinject.eval.prompts import PromptFileError, load_prompts, select_prompts
    from styleinject.eval.runner import evaluate_adapter
    from styleinject.eval.scorers import ScorerLoadError

    try:
        prompts = select_prompts(load_prompts(args.prompts), categories=args.categories,
                                 per_category=args.per_category, limit=args.limit)
    except (PromptFileError, ValueError) as error:
        raise UserError(str(error)) from error  # no option fields in these
    output = Path(args.output)
    total = len(prompts) * len(args.seeds)
    print(f"evaluating {len(prompts)} prompts x {len(args.seeds)} seeds = {total} samples "
          f"with {', '.join(scorers)}")
    with tqdm(total=total, desc="eval", unit="sample") as bar:
        try:
            report = evaluate_adapter(
                args.base_model, args.adapter, prompts=prompts, seeds=args.seeds, steps=args.steps,
                guidance_scale=args.guidance_scale, width=args.resolution, height=args.resolution,
                negative_prompt=args.negative_prompt, adapter_scale=args.adapter_scale, scorers=scorers,
                scorer_paths={"clipscore": args.clip_model, "pickscore": args.pickscore_model,
                              "pickscore_processor": args.pickscore_processor,
                              "imagereward": args.imagereward_model,
                              "imagereward_tokenizer": args.imagereward_tokenizer},
                output_dir=output, save_images=args.save_images, device=args.device,
                dtype=getattr(torch, args.dtype) if args.dtype else None, batch_size=args.batch_size,
                progress=lambda done, _total: bar.update(done - bar.n))
        except ScorerLoadError:
            raise  # names its option by field: `styleinject` main renders it as our flag (--clip-model)
        except OSError as error:  # e.g. a hub id that cannot be fetched offline
            from styleinject.eval.scorers import one_line

            raise UserError(one_line(error)) from error
    for name, stats in report["summary"]["overall"].items():
        ci = "" if stats["ci95"] is None else f" +- {stats['ci95']:.3f}"
        print(f"{name}: {stats['mean']:.3f}{ci} (95% CI, {stats['n_prompts']} prompts)")
    print(f"wrote {output / 'report.json'}, {output / 'report.csv'}, {output / 'summary.csv'}")
    return 0
