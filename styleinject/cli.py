"""`styleinject` command line: generate, train (finetune/distill/dreambooth), eval, adapter, serve, worker."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from styleinject.errors import option_names, render_message

# Modules that add their own sub-commands; each imports only argparse at module level so that
# `styleinject --help` stays fast and works without the optional extras installed. Other installed
# packages add theirs through this entry point group (the service: serve, apikey, db, worker); the
# library never imports them by name.
_COMMAND_MODULES = ("styleinject.train.cli", "styleinject.eval.cli", "styleinject.interop.cli")
COMMANDS_GROUP = "styleinject.commands"


def _command_modules() -> list[str]:
    from importlib.metadata import entry_points

    return [*_COMMAND_MODULES, *sorted({ep.module for ep in entry_points(group=COMMANDS_GROUP)})]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate images with Euler Ancestral sampling, optionally with an adapter",
        description="Generate images from a Stable Diffusion 1.x/2.x or SDXL model (hub id, local folder or "
                    "single-file .safetensors) with Euler Ancestral sampling. Without --adapter the image "
                    "equals diffusers' own.")
    p.add_argument("--base-model", default=os.environ.get("STYLEINJECT_BASE_MODEL"),
                   help="hub id, diffusers folder, or single-file .safetensors with its configs in NAME.config/ "
                        "beside it (default: $STYLEINJECT_BASE_MODEL, else "
                        "the toy demo model shipped with the package, which draws shapes at 32 x 32)")
    p.add_argument("--adapter", help="adapter folder written by training or save_adapter")
    p.add_argument("--adapter-scale", type=float, default=1.0,
                   help="multiplies the adapter's effect; 0 = base model (default: 1.0)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    model_default = "the model's generation_defaults.json, else"
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default: {model_default} 30)")
    p.add_argument("--guidance-scale", type=float, default=None, help=f"default: {model_default} 7.5")
    p.add_argument("--width", type=int, default=None,
                   help=f"multiple of 8 (default: {model_default} the UNet's native size, 512 for SD 1.5)")
    p.add_argument("--height", type=int, default=None, help="multiple of 8 (default: as --width)")
    p.add_argument("--num-images", type=int, default=1, help="default: 1")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--output", required=True, type=Path,
                   help="PNG file; with --num-images > 1 files are named NAME-0.png, NAME-1.png, ...")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import torch
    from tqdm import tqdm

    from styleinject.pipeline import generate, generation_defaults, load_pipeline

    if not args.base_model:
        from styleinject.assets import TOY_BASE

        args.base_model = str(TOY_BASE)
    if args.output.suffix.lower() != ".png":
        raise UserError(f"--output {args.output}: give a .png file name")
    if args.adapter and not Path(args.adapter).is_dir():
        raise UserError(f"--adapter {args.adapter}: no such folder; pass a folder holding "
                        "adapter_config.json and adapter_model.safetensors")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = load_pipeline(args.base_model, device=args.device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    with tqdm(total=args.steps or generation_defaults(pipe)["steps"], desc="denoising", unit="step") as bar:
        images = generate(pipe, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                          steps=args.steps, guidance_scale=args.guidance_scale, width=args.width,
                          height=args.height, num_images=args.num_images, adapter=args.adapter,
                          adapter_scale=args.adapter_scale,
                          progress=lambda step, total: bar.update(1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        paths = [args.output]
    else:
        paths = [args.output.with_name(f"{args.output.stem}-{i}.png") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from styleinject import __version__

    parser = argparse.ArgumentParser(
        prog="styleinject",
        description="Train and serve StyleInject adapters for Stable Diffusion UNets.")
    parser.add_argument("--version", action="version", version=f"styleinject {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_generate(subparsers)
    for name in _command_modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part is not installed in this copy
            raise
        module.add_commands(subparsers)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from styleinject.adapters import AdapterLoadError

    try:
        return int(args.func(args) or 0)
    except (UserError, AdapterLoadError, FileNotFoundError, ValueError) as exc:
        # library errors name options by field; say them as this command's flags
        flags = option_names(_subparser(parser, args.command))
        print(f"styleinject {args.command}: error: {render_message(exc, flags)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"styleinject {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
