"""`styleinject finetune|distill|dreambooth`: help, bad input, a real run, cancel by signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from styleinject.adapters.io import read_adapter_metadata
from styleinject.train.cli import main
from styleinject.train.data import inspect_dataset
from tests.train.helpers import image_folder

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--resolution", "64", "--rank", "4", "--num-styles", "2", "--sample-steps", "2"]


def _help(capsys, kind: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([kind, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks


def test_help_documents_every_flag_with_defaults(capsys):
    common = ["--base-model", "--data", "--output", "--steps", "--resolution", "--seed", "--rank", "--num-styles",
              "--alpha", "--targets", "--style-targets", "--conv-targets", "--no-dma", "--no-sta", "--lora",
              "--batch-size", "--grad-accum", "--lr", "--mixed-precision", "--gradient-checkpointing",
              "--checkpoint-every", "--keep-checkpoints", "--resume", "--validation-every",
              "--validation-prompt", "--skip-bad"]
    extra = {"finetune": [], "distill": ["--teacher-model", "--feat-kd-weight", "--feat-kd-blocks"],
             "dreambooth": ["--instance-prompt", "--class-prompt", "--class-data", "--num-class-images",
                            "--prior-loss-weight"]}
    for kind in ("finetune", "distill", "dreambooth"):
        text = _help(capsys, kind)
        for flag in common + extra[kind]:
            assert flag in text, (kind, flag)
        for default in ("r: rank of every low-rank update (default: 32)", "(default: 16)", "(default: 0.0001)",
                        "(default: ['to_q', 'to_v'])", "(default: ['to_q'])", "default: the base model's native size"):
            assert default in text, (kind, default)
    assert "(default: ['conv1', 'conv2'])" in _help(capsys, "distill")
    assert "(default: ['down_blocks.1', 'mid_block', 'up_blocks.0'])" in _help(capsys, "distill")


def test_library_cli_exposes_the_commands():
    from styleinject.cli import build_parser as library_parser

    args = library_parser().parse_args(["dreambooth", "--base-model", "b", "--data", "d", "--output", "o",
                                        "--instance-prompt", "sks"])
    assert args.kind == "dreambooth" and args.func.__module__ == "styleinject.train.cli"


@pytest.mark.parametrize("argv, expected", [
    (["--data", "{tmp}/nope"], r"nope: dataset not found; check the --data path"),
    (["--data", "{bad}"], r"img0.png: no caption \(expected img0.txt next to it\)"),
    (["--data", "{good}", "--resolution", "60"], r"--resolution must be a positive multiple of 8"),
    (["--data", "{good}", "--base-model", "{tmp}/no-model"], r"--base-model .*no-model: cannot load it"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    good = image_folder(tmp_path / "good", n=1)
    bad = image_folder(tmp_path / "bad", n=1)
    (bad / "img0.txt").unlink()
    argv = [a.format(tmp=tmp_path, good=good, bad=bad) for a in argv]
    base = ["finetune", "--base-model", str(tmp_path / "unused"), "--output", str(tmp_path / "out"),
            "--steps", "1", *SMALL]
    if "--base-model" not in argv:
        (tmp_path / "unused").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(base + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(expected, err[0]), err


def test_cli_run_writes_adapter_with_metadata(tmp_path, tiny_pipeline_path, capsys):
    data = image_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    argv = ["finetune", "--base-model", str(tiny_pipeline_path), "--data", str(data), "--output", str(out),
            "--steps", "2", "--seed", "7", "--lora", *SMALL]
    assert main(argv) == 0
    assert "Saved adapter to" in capsys.readouterr().out
    meta = read_adapter_metadata(out)
    assert meta["kind"] == "finetune" and meta["base_model"] == str(tiny_pipeline_path)
    assert meta["steps"] == "2" and meta["seed"] == "7" and meta["adapter_variant"] == "lora"
    assert meta["data_sha256"] == inspect_dataset(data).sha256
    # re-running with --resume latest continues from that folder's newest checkpoint
    assert main(argv[:argv.index("--steps")] + ["--steps", "3", "--seed", "7", "--lora", *SMALL,
                                                "--resume", "latest"]) == 0
    assert read_adapter_metadata(out)["steps"] == "3"


def test_cancel_by_signal_exits_0_with_a_loadable_checkpoint(tmp_path, tiny_pipeline_path):
    data = image_folder(tmp_path / "data", n=1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "styleinject.cli", "finetune", "--base-model", str(tiny_pipeline_path),
           "--data", str(data), "--output", str(out), "--steps", "100000", "--checkpoint-every", "0", *SMALL]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_chunks: list[str] = []
    started = threading.Event()

    def read_stderr():
        while chunk := proc.stderr.read(64):
            err_chunks.append(chunk)
            if re.search(r"\b[1-9]\d*/100000", "".join(err_chunks)):
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(120), "".join(err_chunks)[-2000:]
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    assert proc.returncode == 0, "".join(err_chunks)[-2000:]
    assert "Traceback" not in "".join(err_chunks)
    match = re.search(r"Cancelled at step (\d+)/100000; checkpoint saved in (\S+)\. Re-run the same command "
                      r"with --resume latest to continue\.", stdout)
    assert match, stdout
    checkpoint = Path(match.group(2))
    assert checkpoint.name == f"step-{int(match.group(1)):06d}" and checkpoint.parent == out / "checkpoints"
    from styleinject import load_adapter
    from styleinject.pipeline import load_pipeline

    load_adapter(load_pipeline(tiny_pipeline_path, device="cpu").unet, checkpoint)
    assert not (out / "adapter_model.safetensors").exists()
