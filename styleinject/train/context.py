"""What the loop hands a training kind: the run's models, data, RNG and accelerator.

A kind module (finetune.py, distill.py, dreambooth.py) supplies ``build(ctx) -> Task``; it imports
this module, ``config`` and ``losses``, never ``loop`` (the loop finds kinds by name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from styleinject.train.config import TrainConfig
from styleinject.train.data import LoadedDataset


@dataclass
class Models:
    """The student pipeline's parts. ``unet`` is the model being trained (accelerate-prepared)."""

    pipe: Any  # StableDiffusion(XL)Pipeline (Euler Ancestral): sampling, and text conditioning (families)
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any  # DDPMScheduler: forward noising and targets
    weight_dtype: torch.dtype


@dataclass
class TrainContext:
    cfg: TrainConfig
    accelerator: Any
    models: Models
    data: LoadedDataset
    generator: torch.Generator  # all training noise comes from here (saved in checkpoints)
    output_dir: Path

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Task(Protocol):
    dataset: Any  # len() and get(index, aug_seed) -> dict of arrays / strings

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...
