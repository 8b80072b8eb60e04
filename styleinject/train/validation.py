"""Validation samples: the same prompts and seeds rendered with the adapter as it trains.

``write_samples(ctx, unet, folder)`` renders every validation prompt once per validation seed
(Euler Ancestral, ``sample_steps``, ``validation_guidance_scale`` or the model's default guidance,
the training resolution) and writes into
``folder``::

    samples.png     the grid: one row per prompt, one column per seed (cells at most 256 px,
                    2 px apart)
    samples.json    {"prompts", "seeds", "images": [[file per seed] per prompt], settings}
    samples/p00-s0.png ...   every cell at full size (scorers read these)

The loop calls it for ``validation_every`` (into ``validation/step-NNNNNN/``) and, with
``checkpoint_samples``, inside each checkpoint before the checkpoint is complete, so a checkpoint
folder carries its samples wherever it is copied (the service's artifact store, a download).
Prompts and seeds are fixed for the whole run, so the grids of two checkpoints differ only by
what the adapter learned in between. ``score_samples(folder, scorers)`` scores them (the service
does it for every checkpoint as it is written, to mark the best one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from styleinject.train.config import TrainConfig
from styleinject.train.context import TrainContext
from styleinject.train.data import LoadedDataset

GRID_NAME = "samples.png"
SAMPLES_JSON = "samples.json"
SAMPLES_DIR = "samples"
MAX_CELL_PX = 256  # grid cells are shrunk to this (the full-size images are kept beside it)
GRID_GAP_PX = 2  # white lines between the cells, so neighbouring samples never run together
DEFAULT_PROMPTS_FROM_DATA = 4


def sample_prompts(cfg: TrainConfig, data: LoadedDataset) -> list[str]:
    """The run's validation prompts: ``validation_prompts``; else dreambooth's ``instance_prompt``;
    else the first few distinct captions of the dataset (what the adapter is trained to draw)."""
    if cfg.validation_prompts:
        return list(cfg.validation_prompts)
    if cfg.kind == "dreambooth" and cfg.instance_prompt:
        return [cfg.instance_prompt]
    captions = dict.fromkeys(item.text.strip() for item in data.items if item.text and item.text.strip())
    return list(captions)[:DEFAULT_PROMPTS_FROM_DATA] or [""]


def make_grid(rows: Sequence[Sequence[Image.Image]], max_cell: int = MAX_CELL_PX, gap: int = GRID_GAP_PX
              ) -> Image.Image:
    """Images in a grid (row by row) with ``gap`` white pixels between cells, each cell the first
    image's size, shrunk to ``max_cell`` px on its longer side; small images are kept at their size
    (pages scale them up)."""
    width, height = rows[0][0].size
    shrink = min(1.0, max_cell / max(width, height))
    cell = (max(1, round(width * shrink)), max(1, round(height * shrink)))
    cols = max(len(row) for row in rows)
    step = (cell[0] + gap, cell[1] + gap)
    grid = Image.new("RGB", (cols * step[0] - gap, len(rows) * step[1] - gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = image.convert("RGB")
            if tile.size != cell:
                tile = tile.resize(cell, Image.LANCZOS)
            grid.paste(tile, (c * step[0], r * step[1]))
    return grid


def write_samples(ctx: TrainContext, unet, folder: Path) -> dict:
    """Render the validation grid with the adapter being trained into ``folder`` (main process
    only; other processes return at once). Returns the ``samples.json`` record."""
    if not ctx.accelerator.is_main_process:
        return {}
    from styleinject.pipeline import generate, generation_defaults

    cfg = ctx.cfg
    guidance = cfg.validation_guidance_scale
    if guidance is None:  # what the playground uses for this model, so the grid looks like its images
        guidance = generation_defaults(ctx.models.pipe)["guidance_scale"]
    prompts, seeds = sample_prompts(cfg, ctx.data), [int(s) for s in cfg.validation_seeds]
    (folder / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    model = ctx.accelerator.unwrap_model(unet)
    model.eval()
    rows, files = [], []
    try:
        # the training RNG streams must not move: sampling draws from its own seeded generators,
        # and fork_rng restores the global state anything else might touch
        with torch.random.fork_rng(devices=[]), ctx.accelerator.autocast():
            for p, prompt in enumerate(prompts):
                row, names = [], []
                for seed in seeds:
                    image = generate(ctx.models.pipe, prompt, seed=seed, steps=cfg.sample_steps,
                                     guidance_scale=guidance, width=cfg.resolution,
                                     height=cfg.resolution, adapter=cfg.adapter_name)[0]
                    name = f"{SAMPLES_DIR}/p{p:02d}-s{seed}.png"
                    image.save(folder / name)
                    row.append(image)
                    names.append(name)
                rows.append(row)
                files.append(names)
    finally:
        model.train()
    make_grid(rows).save(folder / GRID_NAME)
    record = {"prompts": prompts, "seeds": seeds, "images": files, "grid": GRID_NAME,
              "steps": cfg.sample_steps, "guidance_scale": guidance, "resolution": cfg.resolution}
    (folder / SAMPLES_JSON).write_text(json.dumps(record, indent=2))
    return record


def read_samples(folder: str | Path) -> dict | None:
    """The ``samples.json`` record of a checkpoint or validation folder, None when it has none."""
    path = Path(folder) / SAMPLES_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def score_samples(folder: str | Path, scorers) -> dict[str, dict] | None:
    """Score a folder's validation samples (``write_samples``) with loaded ``Scorer`` objects:
    metric -> {"mean", "ci95", "n_prompts", "n_samples", ...}, the seeds of a prompt averaged first
    (``styleinject.eval.runner.summarize``). None when the folder has no samples."""
    from styleinject.eval.runner import summarize

    record = read_samples(folder)
    if record is None:
        return None
    folder = Path(folder)
    rows, images, prompts = [], [], []
    for p, (prompt, files) in enumerate(zip(record["prompts"], record["images"], strict=True)):
        for name in files:
            rows.append({"prompt_id": f"p{p:02d}", "category": "validation"})
            images.append(folder / name)
            prompts.append(prompt)
    for scorer in scorers:
        for row, value in zip(rows, scorer.score(images, prompts), strict=True):
            row[scorer.name] = value
    return summarize(rows, [s.name for s in scorers])["overall"]
