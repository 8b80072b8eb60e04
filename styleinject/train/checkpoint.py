"""Training checkpoints: safetensors for tensors, JSON for everything else (never pickle).

Layout of ``<output>/checkpoints/step-000123/``::

    adapter_config.json           save_adapter(): a loadable adapter folder on its own
    adapter_model.safetensors
    optimizer.safetensors         AdamW state tensors, keys "state.<param index>.<name>"
    optimizer.json                param groups, parameter names, non-tensor state
    rng_0.safetensors             torch CPU / CUDA RNG states and the noise generator (one per process)
    training_state.json           step, data order, Python and NumPy RNG, config; written last
    pinned                        optional: kept by prune_checkpoints (text: why)

A checkpoint is written into ``checkpoints/.tmp-step-000123`` and renamed when complete, so a
crash never leaves a half checkpoint under a final name.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "training_state.json"
PIN_NAME = "pinned"  # present: prune_checkpoints keeps this checkpoint whatever its age
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_NAME = "rng_{}.safetensors"  # one per process
STATE_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a training_state.json), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial(output_dir: str | Path) -> None:
    """Remove leftovers of a checkpoint write that crashed."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for path in root.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (``keep <= 0`` keeps all) and every pinned one."""
    if keep <= 0:
        return
    for path in list_checkpoints(output_dir)[:-keep]:
        if not (path / PIN_NAME).exists():
            shutil.rmtree(path, ignore_errors=True)


def pin_checkpoint(path: str | Path, reason: str) -> None:
    """Exempt a checkpoint from pruning (the service pins a job's best-scoring checkpoint, which is
    often not among the newest few)."""
    (Path(path) / PIN_NAME).write_text(reason + "\n")


def unpin_checkpoint(path: str | Path) -> None:
    (Path(path) / PIN_NAME).unlink(missing_ok=True)


def tmp_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f".tmp-{checkpoint_name(step)}"


def finalize(output_dir: str | Path, step: int) -> Path:
    """Rename the finished temporary folder to its final name (replacing a same-step checkpoint)."""
    tmp = tmp_dir(output_dir, step)
    final = Path(output_dir) / CHECKPOINTS_DIR / checkpoint_name(step)
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    return final


# -- optimizer ---------------------------------------------------------------------------------


def save_optimizer(optimizer, param_names: list[str], directory: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(directory / OPTIMIZER_TENSORS))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    (directory / OPTIMIZER_JSON).write_text(json.dumps(
        {"param_groups": groups, "param_names": param_names, "scalars": scalars}, indent=2))


def load_optimizer(optimizer, param_names: list[str], directory: Path) -> None:
    meta = json.loads((directory / OPTIMIZER_JSON).read_text())
    if meta["param_names"] != param_names:
        raise ValueError(f"{directory}: optimizer state is for other adapter parameters; resume with "
                         "the same adapter settings")
    tensors = load_file(str(directory / OPTIMIZER_TENSORS))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for group in meta["param_groups"]:
        groups.append({k: (tuple(v) if k == "betas" else v) for k, v in group.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- random number generators ------------------------------------------------------------------


def save_rng(generator: torch.Generator, directory: Path, process_index: int) -> None:
    """This process's torch RNG states (uint8 tensors fit safetensors), one file per process."""
    tensors = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / RNG_NAME.format(process_index)))


def load_rng(generator: torch.Generator, directory: Path, process_index: int) -> None:
    path = directory / RNG_NAME.format(process_index)
    if not path.is_file():
        raise ValueError(f"{directory} has no RNG state for process {process_index}; resume with the "
                         "same number of processes")
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch_cpu"])
    generator.set_state(tensors["generator"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])


def python_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}


def restore_python_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_state(directory: Path, state: dict) -> None:
    (directory / STATE_NAME).write_text(json.dumps({"version": STATE_VERSION, **state}, indent=2, sort_keys=True))


def read_state(directory: Path) -> dict:
    state = json.loads((directory / STATE_NAME).read_text())
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{directory}: checkpoint format version {state.get('version')} is not "
                         f"{STATE_VERSION}; resume with the styleinject version that wrote it")
    return state
