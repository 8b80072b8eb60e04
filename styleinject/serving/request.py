"""A generation request, and the per-request sampling state the engine keeps while it runs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from styleinject.families import Conditioning
from styleinject.serving.tiers import AdapterRef


@dataclass
class Request:
    """What to generate. Unset sampling options take the model's defaults.

    ``adapters`` applies to every image of the request (several adapters are summed, each with its
    scale); for a list of prompts it may instead hold one list per prompt (a mixed request).
    The seed drives one CPU generator for the whole request, as in diffusers: a request gives
    the same images whether it runs alone or batched with others.
    """

    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    adapters: list[AdapterRef] | list[list[AdapterRef]] = field(default_factory=list)
    tenant: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    progress: Callable[[int, int], None] | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def adapters_per_prompt(self) -> list[list[AdapterRef]]:
        adapters = list(self.adapters)
        if adapters and all(isinstance(a, (list, tuple)) for a in adapters):
            if len(adapters) != len(self.prompts):
                raise ValueError(f"{len(adapters)} adapter lists for {len(self.prompts)} prompts: give one "
                                 "per prompt, or one list for the whole request")
            return [list(a) for a in adapters]
        if any(isinstance(a, (list, tuple)) for a in adapters):
            raise ValueError("adapters: give AdapterRefs, or one list of them per prompt, not a mix")
        return [adapters for _ in self.prompts]


@dataclass
class Active:
    """A request admitted to the active batch: its latents and where it is in its schedule."""

    request: Request
    future: Future
    rows: int  # images = prompts x num_images
    cfg: bool
    guidance_scale: float
    timesteps: torch.Tensor  # (steps,)
    sigmas: torch.Tensor  # (steps + 1,), float32 on the CPU like diffusers'
    latents: torch.Tensor  # (rows, C, h, w)
    cond: Conditioning  # the UNet's text conditioning, 2 * rows if cfg else rows: [uncond; cond]
    slot_ids: torch.Tensor  # (rows, K)
    slot_weights: torch.Tensor  # (rows, K)
    generator: torch.Generator
    size: tuple[int, int]  # (height, width): requests of one size share a batch
    keys: list[str] = field(default_factory=list)  # pinned slots, released when it retires
    index: int = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def unet_rows(self) -> int:
        return self.rows * (2 if self.cfg else 1)
