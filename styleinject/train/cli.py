"""``styleinject finetune|distill|dreambooth``: the training commands.

Only argparse and the light ``styleinject.errors`` / ``styleinject.names`` are imported at module
level so ``styleinject --help`` stays fast; the option defaults are read from TrainConfig and
StyleInjectConfig (the paper's: r=32, n=16, alpha=r, DMA+STA on to_q and plain low rank on to_v,
AdamW at a constant 1e-4) when a parser is built, never retyped.
"""

from __future__ import annotations

import argparse
import functools
import sys

from styleinject.errors import option_names, render_message
from styleinject.names import A_INITS, ADAPTER_PRESETS, DISTILL_TEXT_MODES, MIXED_PRECISIONS, TRAIN_KINDS

EXIT_BAD_INPUT = 2

_DESCRIPTIONS = {
    "finetune": "Fine-tune an adapter on image-text pairs (noise-prediction MSE).",
    "distill": "Distil a teacher pipeline into an adapter on the base model (output + feature KD; "
               "output KD only when the data has a teacher_text per item).",
    "dreambooth": "Teach an identifier prompt from a few instance images, optionally with class prior "
                  "preservation.",
}
_DATA_HELP = {
    "finetune": "folder, .zip or .tar(.gz) of images with same-name .txt captions, or a metadata.jsonl",
    "distill": "images with captions (as finetune), a metadata.jsonl with text (+ teacher_text), or a "
               "prompts-only .txt/.jsonl (the teacher's samples are generated and cached)",
    "dreambooth": "folder, .zip or .tar(.gz) of instance images (captions not needed)",
}


def add_commands(subparsers) -> None:
    """Add the finetune, distill and dreambooth sub-commands to an argparse ``subparsers``."""
    for kind in TRAIN_KINDS:
        parser = subparsers.add_parser(kind, help=_DESCRIPTIONS[kind], description=_DESCRIPTIONS[kind],
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_arguments(parser, kind)
        parser.set_defaults(func=run_command, kind=kind)


def _add_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    # Each option's dest is the TrainConfig / StyleInjectConfig field it sets, so field_flags()
    # maps library error fields to these flags without a hand-kept table; defaults come from there too.
    from styleinject.adapters.config import StyleInjectConfig
    from styleinject.train.config import TrainConfig, field_default

    def train(name):
        return field_default(TrainConfig, name)

    def adapter(name):
        return field_default(StyleInjectConfig, name)

    io = p.add_argument_group("input and output")
    io.add_argument("--base-model", required=True, help="student base model: SD 1.x/2.x or SDXL diffusers folder, hub id, or single-file .safetensors (configs in NAME.config/ beside it)")
    io.add_argument("--data", required=True, help=_DATA_HELP[kind])
    io.add_argument("--output", required=True, dest="output_dir", metavar="OUTPUT",
                    help="output folder: final adapter, checkpoints/, validation/")
    io.add_argument("--skip-bad", action="store_true", help="skip (and count) bad items instead of stopping")

    tr = p.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=train("steps"), help="optimizer steps in total (a resumed run "
                    "continues up to this number)")
    tr.add_argument("--resolution", type=int, default=train("resolution"), help="training image side (resize + crop); "
                    "default: the base model's native size (512 for SD 1.5, 32 for the toy model)")
    tr.add_argument("--random-crop", action="store_true", help="random instead of centre crop")
    tr.add_argument("--random-flip", action="store_true", help="mirror half of the images")
    tr.add_argument("--seed", type=int, default=train("seed"), help="seed for initialisation, data order and noise")
    tr.add_argument("--batch-size", type=int, default=train("batch_size"), help="samples per device per micro-step")
    tr.add_argument("--grad-accum", type=int, default=train("gradient_accumulation_steps"),
                    dest="gradient_accumulation_steps", metavar="GRAD_ACCUM", help="micro-steps per optimizer step")
    tr.add_argument("--lr", type=float, default=train("learning_rate"), dest="learning_rate", metavar="LR",
                    help="AdamW learning rate (constant)")
    tr.add_argument("--lr-warmup-steps", type=int, default=train("lr_warmup_steps"),
                    help="linear warm-up steps before the constant lr")
    tr.add_argument("--snr-gamma", type=float, default=train("snr_gamma"),
                    help="min-SNR loss weighting gamma (e.g. 5); off by default"
                    + ("" if kind != "distill" else " (not used by distill)"))
    tr.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=train("mixed_precision"),
                    help="autocast precision; adapter weights stay fp32")
    tr.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    tr.add_argument("--checkpoint-every", type=int, default=train("checkpoint_every"),
                    help="save a checkpoint every N steps (0: only at the end)")
    tr.add_argument("--keep-checkpoints", type=int, default=train("keep_checkpoints"),
                    help="keep the newest K checkpoints (0: all)")
    tr.add_argument("--resume", default=train("resume"), metavar="latest|CHECKPOINT",
                    help="continue from the newest checkpoint in --output (exact: same data order, RNG "
                         "and optimizer state)")
    tr.add_argument("--validation-every", type=int, default=train("validation_every"),
                    help="sample the validation grid every N steps into OUTPUT/validation/ (0: off)")
    tr.add_argument("--validation-prompt", action="append", default=train("validation_prompts"), metavar="PROMPT",
                    dest="validation_prompts", help="a validation prompt (repeat the flag for several; none: "
                    "the first captions of the data)")
    tr.add_argument("--validation-seeds", type=int, nargs="+", default=train("validation_seeds"), metavar="SEED",
                    help="sampling seeds of the validation grid (one column each)")
    tr.add_argument("--checkpoint-samples", action="store_true",
                    help="render the validation grid into every checkpoint (samples.png)")
    tr.add_argument("--validation-guidance", type=float, default=train("validation_guidance_scale"),
                    dest="validation_guidance_scale", metavar="SCALE", help="guidance scale of the validation "
                    "grid; default: the base model's (its generation_defaults.json, else 7.5)")
    tr.add_argument("--sample-steps", type=int, default=train("sample_steps"),
                    help="Euler Ancestral steps for validation"
                    + {"distill": ", teacher samples", "dreambooth": ", class images"}.get(kind, "") + " images")

    ad = p.add_argument_group("adapter")
    ad.add_argument("--lora", action="store_true", help="train the plain LoRA baseline (n=1, no router, no STA)")
    ad.add_argument("--rank", type=int, default=adapter("rank"), help="r: rank of every low-rank update")
    ad.add_argument("--num-styles", type=int, default=adapter("num_styles"),
                    help="n: style down-projections mixed by the router")
    ad.add_argument("--alpha", type=float, default=adapter("alpha"), help="scale numerator, update = alpha/r * B A x "
                    "(default: equal to --rank)")
    ad.add_argument("--targets", nargs="+", default=adapter("target_modules"), metavar="NAME", dest="target_modules",
                    help="Linear layers that get an adapter (name suffix or regex)")
    ad.add_argument("--style-targets", nargs="*", default=adapter("style_modules"), metavar="NAME",
                    dest="style_modules", help="of those, the layers that get DMA + STA (the rest: plain low rank)")
    conv_default = ["conv1", "conv2"] if kind == "distill" else adapter("conv_target_modules")
    ad.add_argument("--conv-targets", nargs="*", default=conv_default, metavar="NAME", dest="conv_target_modules",
                    help="Conv2d layers that get a low-rank adapter (e.g. conv1 conv2: the resnets)")
    ad.add_argument("--no-dma", action="store_true", help="ablation: no dynamic multi-style mixing (n=1)")
    ad.add_argument("--no-sta", action="store_true", help="ablation: no AdaIN style transfer term")
    ad.add_argument("--preset", choices=ADAPTER_PRESETS, default=ADAPTER_PRESETS[0],
                    help="paper-text: the paper's text (DMA + STA on to_q, plain low rank on to_v); "
                         "paper-counts: the placement that reproduces its parameter counts (DMA + STA on "
                         "to_q and to_v, router kept at n=1, bias on G; sets --targets/--style-targets)")
    ad.add_argument("--a-init", choices=A_INITS, default=adapter("a_init"),
                    help="initial scale of each style down-projection A_i: lora (each like a LoRA A) or "
                         "mixture (x sqrt(n): a uniform router's initial mixture has a LoRA A's scale)")

    if kind == "distill":
        ds = p.add_argument_group("distillation")
        ds.add_argument("--teacher-model", required=True, help="teacher model, of the student's family: diffusers folder, hub id, or single-file .safetensors (configs in NAME.config/ beside it)")
        ds.add_argument("--feat-kd-weight", type=float, default=train("feat_kd_weight"),
                        help="lambda of L_FeatKD (shared text encoder)")
        ds.add_argument("--feat-kd-blocks", nargs="+", default=train("feat_kd_blocks"),
                        metavar="BLOCK", help="UNet blocks whose outputs L_FeatKD matches")
        ds.add_argument("--distill-text", choices=DISTILL_TEXT_MODES, default=train("distill_text"),
                        help="shared: both UNets get 'text' (OutKD + FeatKD); unshared: the teacher gets "
                             "'teacher_text' (OutKD only); auto: unshared iff the data has teacher_text")
    if kind == "dreambooth":
        db = p.add_argument_group("dreambooth")
        db.add_argument("--instance-prompt", required=True, help="identifier prompt, e.g. 'a photo of sks dog'")
        db.add_argument("--class-prompt", default=train("class_prompt"), help="class prompt, e.g. 'a photo of a dog'; "
                        "enables prior preservation")
        db.add_argument("--class-data", default=train("class_data"),
                        help="class images (folder/archive); missing ones are generated by the base "
                             "model into OUTPUT/class_images/")
        db.add_argument("--num-class-images", type=int, default=train("num_class_images"), help="class images to use")
        db.add_argument("--prior-loss-weight", type=float, default=train("prior_loss_weight"),
                        help="weight of the prior loss")


def config_from_args(args: argparse.Namespace):
    """TrainConfig from parsed arguments."""
    from styleinject.adapters import StyleInjectConfig
    from styleinject.train.config import TrainConfig, TrainingError, field_default

    if args.lora:
        if args.preset != ADAPTER_PRESETS[0]:
            raise TrainingError("{lora} trains plain LoRA; it takes no {preset}")
        adapter = StyleInjectConfig.lora(rank=args.rank, alpha=args.alpha, target_modules=args.target_modules,
                                         conv_target_modules=args.conv_target_modules)
    else:
        fields = {"rank": args.rank, "num_styles": args.num_styles, "alpha": args.alpha,
                  "conv_target_modules": args.conv_target_modules, "dma": not args.no_dma,
                  "sta": not args.no_sta, "a_init": args.a_init}
        for name in ("target_modules", "style_modules"):  # at their defaults: not given, the preset's
            value = getattr(args, name)
            if value != field_default(StyleInjectConfig, name):
                fields[name] = value
        adapter = StyleInjectConfig.from_preset(args.preset, **fields)
    extra = {}
    if args.kind == "distill":
        extra = {"teacher_model": args.teacher_model, "feat_kd_weight": args.feat_kd_weight,
                 "feat_kd_blocks": args.feat_kd_blocks, "distill_text": args.distill_text}
    elif args.kind == "dreambooth":
        extra = {"instance_prompt": args.instance_prompt, "class_prompt": args.class_prompt,
                 "class_data": args.class_data, "num_class_images": args.num_class_images,
                 "prior_loss_weight": args.prior_loss_weight}
    return TrainConfig(
        kind=args.kind, base_model=args.base_model, data=args.data, output_dir=args.output_dir, steps=args.steps,
        resolution=args.resolution, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate, lr_warmup_steps=args.lr_warmup_steps, seed=args.seed,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        snr_gamma=args.snr_gamma, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, validation_every=args.validation_every,
        validation_prompts=args.validation_prompts, validation_seeds=args.validation_seeds,
        checkpoint_samples=args.checkpoint_samples, validation_guidance_scale=args.validation_guidance_scale,
        sample_steps=args.sample_steps,
        center_crop=not args.random_crop, random_flip=args.random_flip, skip_bad=args.skip_bad,
        adapter=adapter, **extra)


@functools.cache
def field_flags(kind: str) -> dict[str, str]:
    """TrainConfig / StyleInjectConfig field -> this command's flag (from the parser itself)."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_arguments(parser, kind)
    return option_names(parser)


def _fail(error: BaseException, kind: str) -> None:
    """One line on stderr (fields named as this command's flags) and exit 2."""
    print(f"error: {render_message(error, field_flags(kind))}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def run_command(args: argparse.Namespace) -> int:
    """Run one training command; bad input: one line on stderr and exit 2; cancelled (Ctrl-C /
    SIGTERM): final checkpoint, a message, exit 0."""
    import logging
    import signal
    import threading

    from tqdm import tqdm

    from styleinject.adapters import AdapterLoadError
    from styleinject.train.data import DatasetError
    from styleinject.train.loop import TrainingError, run_training

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_libraries()
    try:
        cfg = config_from_args(args)
        cfg.check()
    except (ValueError, TrainingError) as exc:
        _fail(exc, args.kind)

    cancel = threading.Event()

    def on_signal(signum, _frame):
        if not cancel.is_set():
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
            cancel.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)

    bars = []  # created at the first step, so errors before training stay one line

    def show(p):
        if not bars:
            bars.append(tqdm(total=p.total, initial=p.step - 1, desc=args.kind, unit="step",
                             dynamic_ncols=True, file=sys.stderr))
        bar = bars[0]
        bar.total = p.total
        bar.n = p.step
        terms = {name.removeprefix("loss_"): f"{value:.4f}" for name, value in p.terms.items()}
        bar.set_postfix(loss=f"{p.loss:.4f}", **terms, lr=f"{p.lr:.1e}", samples_s=f"{p.samples_per_s:.2f}",
                        refresh=False)
        bar.refresh()

    try:
        result = run_training(cfg, progress=show, should_cancel=cancel.is_set)
    except (DatasetError, TrainingError, AdapterLoadError) as exc:
        _fail(exc, args.kind)
    finally:
        for bar in bars:
            bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result.cancelled:
        where = result.checkpoints[-1] if result.checkpoints else cfg.output_dir
        print(f"Cancelled at step {result.steps_done}/{cfg.steps}; checkpoint saved in {where}. Re-run the "
              "same command with --resume latest to continue.", flush=True)
        return 0
    loss = f", last loss {result.loss:.4f}" if result.loss is not None else ""
    print(f"Saved adapter to {result.output_dir} ({result.steps_done} steps{loss}).", flush=True)
    return 0


def _quiet_libraries() -> None:
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="styleinject", description="StyleInject training commands")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
