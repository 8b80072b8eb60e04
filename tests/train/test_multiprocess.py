"""Data-parallel training with ``accelerate launch``: 2 CPU processes (gloo) train the same adapter
as 1 process with the same global batch, and a 2-process run resumes from its checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import image_folder

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--resolution", "64", "--rank", "4", "--num-styles", "2", "--checkpoint-every", "2", "--lr", "1e-2",
        "--steps", "4"]


def train(base: Path, data: Path, out: Path, processes: int, batch_size: int, *extra: str) -> str:
    cli = ["-m", "styleinject.cli", "finetune", "--base-model", str(base), "--data", str(data), "--output", str(out),
           "--batch-size", str(batch_size), *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if processes == 1:
        command = [sys.executable, *cli]
    else:  # what a worker with several GPUs runs; on CPU, accelerate needs ACCELERATE_USE_CPU for gloo
        env["ACCELERATE_USE_CPU"] = "1"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *cli]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


@pytest.fixture(scope="module")
def runs(tiny_pipeline_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    data = image_folder(root / "data", n=4)
    one = train(tiny_pipeline_path, data, root / "one", 1, 2)
    two = train(tiny_pipeline_path, data, root / "two", 2, 1)
    return root, data, one, two


@pytest.mark.slow
def test_multiprocess_two_cpu_processes_equal_one_with_the_same_global_batch(runs):
    root, _, _, _ = runs
    one, two = weights(root / "one"), weights(root / "two")
    moved = max(t.abs().max().item() for t in one.values())
    assert moved > 1e-3  # the adapter trained
    assert_close(one, two, atol=1e-4)
    # rank 0 alone wrote the checkpoints and the adapter
    assert sorted(p.name for p in (root / "two" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


@pytest.mark.slow
def test_multiprocess_resume_from_a_checkpoint(runs, tiny_pipeline_path):
    root, data, _, _ = runs
    resumed = root / "resumed"
    shutil.copytree(root / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (resumed / name).unlink()
    log = train(tiny_pipeline_path, data, resumed, 2, 1, "--resume", "latest")
    assert "step 2" in log, log[-2000:]
    assert_close(weights(root / "two"), weights(resumed), atol=1e-5)
