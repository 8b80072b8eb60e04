"""Data-parallel training for a worker that owns several GPUs: the train task runs the same loop
under ``accelerate launch`` (one process per GPU, ``STYLEINJECT_TRAIN_PROCESSES``) and talks to it
through a folder, so the lease, the database and the artifact store stay in the task's process:

    config.json      the TrainConfig (written by the task)
    progress.jsonl   one Progress per line (rank 0 appends; the task reads and reports it)
    cancel           created by the task when the job's cancel flag is set (rank 0 polls it; the
                     loop's trigger stops every rank at the same step)
    result.json      steps_done, cancelled, loss (rank 0, at the end)
    error.json       the message of the exception that ended the run (rank 0)

Checkpoints and the adapter are written by rank 0 into the job's output folder as in a
one-process run, so resume (``resume="latest"``) works the same. On a machine without CUDA the
processes use gloo on the CPU (``ACCELERATE_USE_CPU``): that is how the tests run it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

log = logging.getLogger("worker.distributed")

POLL_S = 0.5


class DistributedTrainingError(ValueError):
    """The launched run failed; the message is rank 0's (already phrased for the job's owner)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, channel: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "worker.distributed", str(channel)]


def run_launched(cfg, processes: int, progress: Callable[[Any], None], should_cancel: Callable[[], bool]):
    """Run ``cfg`` in ``processes`` data-parallel processes; returns a TrainResult. ``progress`` and
    ``should_cancel`` are called here, in the caller's process (the loop's rank 0 feeds them)."""
    import torch

    from styleinject.train.checkpoint import list_checkpoints
    from styleinject.train.loop import TrainResult

    with tempfile.TemporaryDirectory(prefix="styleinject-ddp-") as folder:
        channel = Path(folder)
        (channel / "config.json").write_text(json.dumps(cfg.to_dict()))
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "1"  # gloo on the CPU
        with open(channel / "launch.log", "wb") as output:
            child = subprocess.Popen(launch_command(processes, channel), env=env, stdout=output,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            seen = 0
            try:
                while True:
                    done = child.poll() is not None
                    seen = _forward_progress(channel / "progress.jsonl", seen, progress)
                    if done:
                        break
                    if not (channel / "cancel").exists() and should_cancel():
                        (channel / "cancel").touch()
                    time.sleep(POLL_S)
            finally:
                if child.poll() is None:  # the task was interrupted (time limit, worker shutdown)
                    os.killpg(child.pid, 15)
                    try:
                        child.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        os.killpg(child.pid, 9)
                        child.wait()
        if (channel / "error.json").exists():
            raise DistributedTrainingError(json.loads((channel / "error.json").read_text())["message"])
        if child.returncode != 0 or not (channel / "result.json").exists():
            tail = (channel / "launch.log").read_text(errors="replace")[-2000:]
            log.error("accelerate launch exited with %s:\n%s", child.returncode, tail)
            raise DistributedTrainingError(f"the {processes}-process training run exited with status "
                                           f"{child.returncode}; see the worker log")
        result = json.loads((channel / "result.json").read_text())
    out = Path(cfg.output_dir)
    return TrainResult(output_dir=out, steps_done=result["steps_done"], cancelled=result["cancelled"],
                       loss=result["loss"], checkpoints=list_checkpoints(out))


def _forward_progress(path: Path, seen: int, progress: Callable[[Any], None]) -> int:
    if not path.exists():
        return seen
    text = path.read_text()
    lines = text.splitlines()
    complete = lines if text.endswith("\n") else lines[:-1]  # a line being written waits for the next poll
    for line in complete[seen:]:
        progress(SimpleNamespace(**json.loads(line)))
    return max(seen, len(complete))


def main(argv: list[str] | None = None) -> int:
    """One rank of the launched run (``python -m worker.distributed CHANNEL`` under accelerate)."""
    import dataclasses

    from styleinject.errors import api_message
    from styleinject.train import TrainConfig, run_training

    channel = Path((argv or sys.argv[1:])[0])
    rank0 = os.environ.get("RANK", "0") == "0"
    cfg = TrainConfig.from_dict(json.loads((channel / "config.json").read_text()))

    def on_progress(p) -> None:  # the loop calls it on the main process only
        with open(channel / "progress.jsonl", "a") as handle:
            handle.write(json.dumps(dataclasses.asdict(p), allow_nan=True) + "\n")

    try:
        result = run_training(cfg, progress=on_progress, should_cancel=lambda: (channel / "cancel").exists())
    except BaseException as exc:
        if rank0:
            (channel / "error.json").write_text(json.dumps({"type": type(exc).__name__,
                                                            "message": api_message(exc).strip() or type(exc).__name__}))
        raise
    if rank0:
        (channel / "result.json").write_text(json.dumps({"steps_done": result.steps_done, "cancelled": result.cancelled,
                                                         "loss": result.loss}, allow_nan=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
