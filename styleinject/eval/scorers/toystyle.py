"""Toy-world style strength: how surely the toy attribute checker reads an image as styled.

    toystyle = 1 - P_checker(style = "none" | image)     in [0, 1]

The checker (``styleinject.eval.toyworld.checker``, shipped as ``styleinject.assets.TOY_CHECKER``)
classifies a toy-world image's style as none, pastel, stripes or outline; a style adapter trained
on one of them moves its samples away from "none". The score ignores the prompt: it measures the
look the adapter adds, while CLIPScore (with the toy CLIP) measures whether the prompt is still
drawn. Only meaningful for toy-world images (32 x 32 shapes; other sizes are resized).
"""

from __future__ import annotations

from typing import Any

import torch

from styleinject.eval.scorers.base import Scorer, ScorerLoadError, one_line


class ToyStyleScorer(Scorer):
    name = "toystyle"

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if model is None:
            from styleinject.assets import TOY_CHECKER

            model = str(TOY_CHECKER)
        self.model_path = str(model)
        self.checker = None

    def _load(self) -> None:
        from styleinject.eval.toyworld.checker import load_checker

        try:
            self.checker = load_checker(self.model_path).to(self.device)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ScorerLoadError(
                "could not load the toy attribute checker from {path!r}: {cause}. Give a folder holding "
                "checker.safetensors and checker_config.json (written by python -m "
                "styleinject.eval.toyworld.checker), or leave it unset for the packaged one",
                path=self.model_path, cause=one_line(error)) from error

    def _score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        from styleinject.eval.toyworld.checker import HEADS, to_tensor

        logits = self.checker(to_tensor(images).to(self.device))["style"]
        return 1.0 - logits.float().softmax(-1)[:, HEADS["style"].index("none")]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_path, "formula": "1 - P_checker(style = none | image)"}

    @classmethod
    def build(cls, model: str | None = None, processor: str | None = None, **kwargs: Any) -> ToyStyleScorer:
        return cls(model, **kwargs)
