"""CLIPScore (Hessel et al., 2021): 100 * w * max(cos(E_I(image), E_T("A photo depicts " + prompt)), 0)."""

from __future__ import annotations

from typing import Any

import torch

from styleinject.eval.scorers.base import CLIPScorerBase

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


class CLIPScorer(CLIPScorerBase):
    """CLIPScore (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
    Captioning"), reported x100:

        CLIP-S(c, v) = w * max(cos(c, v), 0),  w = 2.5,  c = E_T("A photo depicts " + caption)
        reported     = 100 * CLIP-S  (range [0, 250]; divide by 100 for the paper's CLIP-S)

    with the paper's ViT-B/32 CLIP by default. The clamp is per sample, before any averaging.
    """

    name = "clipscore"

    def __init__(
        self,
        model: str = DEFAULT_CLIP_MODEL,
        *,
        w: float = 2.5,
        prefix: str = "A photo depicts ",
        scale: float = 100.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.w = float(w)
        self.prefix = prefix
        self.scale = float(scale)

    def _score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        cos = self.cosine(images, [self.prefix + p for p in prompts])
        return self.scale * self.w * cos.clamp(min=0.0)  # Hessel et al. 2021, eq. 1

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_path,
            "formula": f"{self.scale:g} * {self.w:g} * max(cos(image, '{self.prefix}' + prompt), 0)",
            "w": self.w,
            "prefix": self.prefix,
            "scale": self.scale,
        }

    @classmethod
    def build(cls, model: str | None = None, processor: str | None = None, **kwargs: Any) -> CLIPScorer:
        if processor is not None:
            kwargs["processor"] = processor
        return cls(model or DEFAULT_CLIP_MODEL, **kwargs)
