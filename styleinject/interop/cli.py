"""`styleinject adapter import|export`: LoRA files (diffusers/PEFT, kohya) <-> adapter folders.

Nothing heavy is imported at module level: the library CLI imports this module to build --help.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMAT_CHOICES = ("diffusers", "kohya")  # styleinject.interop.FORMATS, without importing numpy for --help


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "adapter", help="import a LoRA file as an adapter, or export a LoRA-mode adapter as a LoRA file",
        description="Convert between LoRA files (.safetensors in diffusers/PEFT or kohya/A1111/ComfyUI "
                    "format) and StyleInject adapter folders. See docs/adapters.md, 'LoRA files in and out'.")
    commands = p.add_subparsers(dest="adapter_command", metavar="{import,export}", required=True)

    imp = commands.add_parser(
        "import", help="a LoRA file -> a LoRA-mode adapter folder",
        description="Convert a UNet LoRA file (.safetensors; diffusers/PEFT keys 'unet.<module>.lora_A.weight' "
                    "or kohya keys 'lora_unet_<module>.lora_down.weight' + '.alpha') into an adapter folder "
                    "that styleinject generate --adapter, load_adapter and the service use like any other. "
                    "Per-module ranks and alphas are kept. Text-encoder weights, unknown keys and modules the "
                    "base model lacks are an error that lists them; nothing is written then.")
    imp.add_argument("file", type=Path, metavar="FILE", help="the LoRA .safetensors file")
    imp.add_argument("--out", required=True, type=Path, metavar="DIR", help="adapter folder to write")
    imp.add_argument("--base-model", default=None, metavar="FOLDER",
                     help="local diffusers pipeline folder the LoRA is for: module names (kohya's '_' "
                          "spelling) and shapes are matched against its UNet (recommended; read from the "
                          "weights' headers only). Without it, diffusers names are taken as they are, kohya "
                          "names are split by diffusers' UNet naming, and shapes are checked at load time")
    imp.set_defaults(func=run_import)

    exp = commands.add_parser(
        "export", help="a LoRA-mode adapter folder -> a LoRA file",
        description="Write a LoRA-mode adapter (StyleInjectConfig.lora, or an imported LoRA) as a LoRA file: "
                    "'diffusers' loads with diffusers' pipe.load_lora_weights(FILE); 'kohya' with A1111, "
                    "ComfyUI and kohya's scripts. Adapters with DMA or STA are not LoRAs (their router and "
                    "AdaIN depend on the input) and are refused: use their folder with load_adapter.")
    exp.add_argument("adapter_dir", type=Path, metavar="ADAPTER_DIR", help="adapter folder (adapter_config.json + "
                                                                        "adapter_model.safetensors)")
    exp.add_argument("out_file", type=Path, metavar="OUT_FILE", help="the .safetensors file to write")
    exp.add_argument("--format", choices=FORMAT_CHOICES, default="diffusers", help="default: diffusers")
    exp.set_defaults(func=run_export)


def run_import(args: argparse.Namespace) -> int:
    from styleinject.cli import UserError
    from styleinject.interop import import_lora

    if not args.file.is_file():
        raise UserError(f"{args.file}: no such file; pass a LoRA .safetensors file")
    if args.base_model is not None and not Path(args.base_model).is_dir():
        raise UserError(f"--base-model {args.base_model}: not a folder; pass the local diffusers pipeline "
                        "folder the LoRA was made for (or leave --base-model out)")
    out = import_lora(args.file, args.out, base_model=args.base_model)
    print(f"wrote {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from styleinject.cli import UserError
    from styleinject.interop import export_lora

    if not args.adapter_dir.is_dir():
        raise UserError(f"{args.adapter_dir}: no such folder; pass an adapter folder holding "
                        "adapter_config.json and adapter_model.safetensors")
    if args.out_file.suffix != ".safetensors":
        raise UserError(f"{args.out_file}: give a .safetensors file name")
    out = export_lora(args.adapter_dir, args.out_file, format=args.format)
    print(f"wrote {out}")
    return 0
