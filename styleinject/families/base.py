"""The UNet conditioning every family produces, and the interface a family implements."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    """The UNet's conditioning for a batch: ``hidden`` its ``encoder_hidden_states`` (rows, L, D);
    ``added`` its ``added_cond_kwargs`` (empty for SD 1.x/2.x), each tensor with the same rows first.
    Row i of every tensor belongs to sample i, so a batch of several requests is their concatenation."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    def unet_kwargs(self) -> dict:
        kwargs: dict = {"encoder_hidden_states": self.hidden}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        keys = set(items[0].added)
        if any(set(c.added) != keys for c in items):
            raise ValueError("cannot batch conditionings of different model families")
        return Conditioning(torch.cat([c.hidden for c in items]),
                            {k: torch.cat([c.added[k] for c in items]) for k in items[0].added})

    def pad(self, extra: int) -> Conditioning:
        """``extra`` more rows, copies of the last one (padding that the caller discards)."""
        def grow(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x[-1:].expand(extra, *x.shape[1:])]) if extra else x
        return Conditioning(grow(self.hidden), {k: grow(v) for k, v in self.added.items()})


class Family:
    """One model family. Subclasses fill in the class attributes and the methods."""

    name: str  # "sd" or "sdxl"
    pipeline_class: str  # diffusers' pipeline class name
    text_encoder_names: tuple[str, ...]  # the pipeline attributes holding its text encoders
    pipeline_kwargs: dict = {}  # extra from_pretrained / from_single_file arguments

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        return [getattr(pipe, n) for n in self.text_encoder_names if getattr(pipe, n, None) is not None]

    def encode_prompts(self, pipe, prompts: list[str], device, size: tuple[int, int]) -> Conditioning:
        """Training: one row per prompt, no guidance, for images of ``size`` = (height, width)."""
        raise NotImplementedError

    def request_conditioning(self, pipe, prompt, negative_prompt, num_images: int, guidance: bool,
                             device, size: tuple[int, int]) -> Conditioning:
        """Generation: exactly what diffusers' pipeline call computes for these arguments; rows
        ``[uncond; cond]`` when ``guidance``, each ``len(prompts) * num_images`` long."""
        raise NotImplementedError

    def decode(self, pipe, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents to images in [-1, 1], as diffusers' pipeline call decodes them."""
        raise NotImplementedError
