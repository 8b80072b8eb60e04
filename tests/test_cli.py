import subprocess
import sys

import numpy as np
from PIL import Image


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "styleinject.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_help_lists_commands():
    out = _cli("--help")
    assert out.returncode == 0
    assert "generate" in out.stdout


def test_generate_writes_png_and_matches_library(tiny_pipeline_path, tmp_path):
    from styleinject.pipeline import generate, load_pipeline

    out = _cli("generate", "--base-model", tiny_pipeline_path, "--prompt", "a blue circle", "--seed", 3,
               "--steps", 2, "--width", 64, "--height", 64, "--output", tmp_path / "img.png")
    assert out.returncode == 0, out.stderr
    got = np.asarray(Image.open(tmp_path / "img.png"))
    want = generate(load_pipeline(tiny_pipeline_path), "a blue circle", seed=3, steps=2, width=64, height=64)[0]
    assert np.array_equal(got, np.asarray(want))


def test_generate_without_a_base_model_uses_the_demo_model_and_its_defaults(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "STYLEINJECT_BASE_MODEL"}
    out = subprocess.run([sys.executable, "-m", "styleinject.cli", "generate", "--prompt",
                          "two red circles on a white background", "--output", str(tmp_path / "img.png")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "img.png").size == (32, 32)  # the toy base's generation_defaults.json
    assert "30/30" in out.stderr  # the progress bar counts the model's default steps


def test_generate_errors_are_one_clear_line(tiny_pipeline_path, tmp_path):
    out = _cli("generate", "--base-model", tiny_pipeline_path, "--prompt", "x", "--adapter", tmp_path / "nope",
               "--output", tmp_path / "img.png")
    assert out.returncode == 2
    assert "no such folder" in out.stderr and "Traceback" not in out.stderr
    out = _cli("generate", "--base-model", tmp_path, "--prompt", "x", "--output", tmp_path / "img.png")
    assert out.returncode == 2 and "model_index.json" in out.stderr
