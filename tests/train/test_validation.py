"""Validation grids: layout, default prompts, and the grid inside every checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from styleinject.train import run_training
from styleinject.train.checkpoint import list_checkpoints
from styleinject.train.config import TrainConfig
from styleinject.train.data import DatasetInfo, Item, LoadedDataset
from styleinject.train.validation import make_grid, read_samples, sample_prompts
from tests.train.helpers import image_folder


def _solid(colour, size=(8, 6)):
    return Image.new("RGB", size, colour)


def test_grid_puts_prompts_in_rows_and_seeds_in_columns():
    rows = [[_solid((255, 0, 0)), _solid((0, 255, 0))], [_solid((0, 0, 255)), _solid((9, 9, 9))]]
    grid = np.asarray(make_grid(rows, gap=2))
    assert grid.shape == (14, 18, 3)  # 2 x 6 px rows and 2 x 8 px columns, 2 px apart
    assert tuple(grid[0, 0]) == (255, 0, 0) and tuple(grid[0, 17]) == (0, 255, 0)
    assert tuple(grid[13, 0]) == (0, 0, 255) and tuple(grid[13, 17]) == (9, 9, 9)
    assert tuple(grid[0, 8]) == tuple(grid[6, 0]) == (255, 255, 255)  # the gaps
    # large images are shrunk per cell (the full-size files are kept beside the grid)
    assert make_grid([[_solid((1, 2, 3), (512, 512))] * 3], max_cell=128, gap=0).size == (384, 128)


def _data(*texts):
    items = [Item(name=f"i{n}", image=None, text=t) for n, t in enumerate(texts)]
    return LoadedDataset(info=DatasetInfo(format="folder", num_items=len(items), has_teacher_text=False,
                                          sha256="0" * 64), items=items, root=None)


def test_default_prompts_are_the_first_distinct_captions():
    cfg = TrainConfig(kind="finetune", base_model="b", data="d", output_dir="o")
    data = _data("a", "b", "a", " ", None, "c", "d", "e")
    assert sample_prompts(cfg, data) == ["a", "b", "c", "d"]
    assert sample_prompts(TrainConfig(kind="finetune", base_model="b", data="d", output_dir="o",
                                      validation_prompts=["x"]), data) == ["x"]
    booth = TrainConfig(kind="dreambooth", base_model="b", data="d", output_dir="o", instance_prompt="sks dog")
    assert sample_prompts(booth, data) == ["sks dog"]
    assert sample_prompts(cfg, _data(None)) == [""]  # images without captions: unconditional samples


def _adapter(folder: Path) -> dict:
    return {k: v.clone() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


def test_every_checkpoint_carries_its_grid_and_training_is_unchanged(tmp_path, make_cfg, tiny_pipe):
    data = image_folder(tmp_path / "data", n=3)
    plain = run_training(make_cfg(data=data, steps=4, learning_rate=1e-2, checkpoint_every=2, output="plain"))
    cfg = make_cfg(data=data, steps=4, learning_rate=1e-2, checkpoint_every=2, output="sampled",
                   checkpoint_samples=True, validation_seeds=[5, 7])
    sampled = run_training(cfg)
    steps = [p.name for p in list_checkpoints(sampled.output_dir)]
    assert steps == ["step-000002", "step-000004"]
    for folder in list_checkpoints(sampled.output_dir):
        record = read_samples(folder)
        assert record["prompts"] == [f"a red photo number {i}" for i in range(3)]
        assert record["seeds"] == [5, 7] and record["steps"] == 2 and record["resolution"] == 64
        assert Image.open(folder / "samples.png").size == (2 * 64 + 2, 3 * 64 + 2 * 2)
        assert all((folder / name).is_file() for row in record["images"] for name in row)
        assert json.loads((folder / "training_state.json").read_text())["step"] in (2, 4)
    assert read_samples(list_checkpoints(plain.output_dir)[0]) is None
    # fixed seeds: the cells change between checkpoints only because the adapter changed
    first, last = (np.asarray(Image.open(f / "samples.png"), dtype=np.int16)
                   for f in list_checkpoints(sampled.output_dir))
    assert np.abs(first - last).max() > 0
    # each cell is the image generate() gives for its prompt and seed with that checkpoint's adapter
    from styleinject.pipeline import generate, generation_defaults

    folder = list_checkpoints(sampled.output_dir)[-1]
    record = read_samples(folder)
    assert record["guidance_scale"] == generation_defaults(tiny_pipe)["guidance_scale"]  # the model's default
    again = generate(tiny_pipe, record["prompts"][1], seed=7, steps=2, width=64, height=64, adapter=str(folder),
                     guidance_scale=record["guidance_scale"])[0]
    cell = Image.open(folder / record["images"][1][1])
    assert np.abs(np.asarray(again, dtype=np.int16) - np.asarray(cell, dtype=np.int16)).max() <= 1
    # sampling never moves the training RNG streams: the same weights as the run without samples
    a, b = _adapter(plain.output_dir), _adapter(sampled.output_dir)
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
