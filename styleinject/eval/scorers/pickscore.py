"""PickScore (Kirstain et al., 2023): exp(logit_scale) * cos(E_I(image), E_T(prompt)) - 21.0."""

from __future__ import annotations

from typing import Any

import torch

from styleinject.eval.scorers.base import CLIPScorerBase

DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScorer(CLIPScorerBase):
    """PickScore (Kirstain et al., 2023, "Pick-a-Pic"): the CLIP-H model fine-tuned on human
    preferences, scored as its own logit, exp(logit_scale) * cos(image, prompt), then offset by
    -21.0 as the StyleInject paper reports it (so typical SD 1.5 samples land around 0..1.5).
    No prompt prefix, no clamp. The processor is LAION's CLIP-ViT-H-14, as in the official code.
    """

    name = "pickscore"
    _model_field = "pickscore_model"
    _processor_field = "pickscore_processor"
    _what = "PickScore model"

    def __init__(
        self,
        model: str = DEFAULT_PICKSCORE_MODEL,
        processor: str | None = DEFAULT_PICKSCORE_PROCESSOR,
        *,
        offset: float = 21.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, processor if processor is not None else DEFAULT_PICKSCORE_PROCESSOR, **kwargs)
        self.offset = float(offset)

    def _score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        logit_scale = self.model.logit_scale.exp().float()
        return logit_scale * self.cosine(images, prompts) - self.offset

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_path,
            "processor": self.processor_path,
            "formula": f"exp(logit_scale) * cos(image, prompt) - {self.offset:g}",
            "offset": self.offset,
        }

    @classmethod
    def build(cls, model: str | None = None, processor: str | None = None, **kwargs: Any) -> PickScorer:
        return cls(model or DEFAULT_PICKSCORE_MODEL, processor or DEFAULT_PICKSCORE_PROCESSOR, **kwargs)
