"""Image-text scorers and their registry: CLIPScore, PickScore and ImageReward, one module each.

Every scorer loads its weights lazily, on the first `score()` call (or an explicit `load()`),
from a hub id or a local folder: importing this package never touches the disk or the network.
Scores are computed under `torch.no_grad()` in eval mode, in batches, on the chosen device, and
are deterministic for fixed inputs. Conventions (docs/evaluation.md has the full derivation):

    CLIPScore   = 100 * w * max(cos(E_I(image), E_T("A photo depicts " + prompt)), 0),  w = 2.5
    PickScore   = exp(logit_scale) * cos(E_I(image), E_T(prompt)) - 21.0
    ImageReward = (MLP(BLIP(image, prompt)[CLS]) - mean) / std
    toystyle    = 1 - P_checker(style = none | image)   (toy world only; the packaged checker)

`SCORERS` maps each name of `styleinject.names.SCORER_NAMES` to its class; a scorer module
imports `base` only, never this package or another scorer.
"""

from __future__ import annotations

from typing import Any

from styleinject.eval.scorers.base import (
    ImageLike,
    Scorer,
    ScorerLoadError,
    describe_missing,
    load_image_processor,
    one_line,
    resolve_device,
    to_pil,
)
from styleinject.eval.scorers.clipscore import DEFAULT_CLIP_MODEL, CLIPScorer
from styleinject.eval.scorers.imagereward import (
    DEFAULT_IMAGEREWARD_MODEL,
    DEFAULT_IMAGEREWARD_TOKENIZER,
    ImageRewardScorer,
)
from styleinject.eval.scorers.pickscore import DEFAULT_PICKSCORE_MODEL, DEFAULT_PICKSCORE_PROCESSOR, PickScorer
from styleinject.eval.scorers.toystyle import ToyStyleScorer
from styleinject.names import SCORER_NAMES

SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (CLIPScorer, PickScorer, ImageRewardScorer,
                                                         ToyStyleScorer)}
assert tuple(SCORERS) == SCORER_NAMES, "styleinject.names.SCORER_NAMES and the scorer registry disagree"

__all__ = [
    "DEFAULT_CLIP_MODEL", "DEFAULT_IMAGEREWARD_MODEL", "DEFAULT_IMAGEREWARD_TOKENIZER", "DEFAULT_PICKSCORE_MODEL",
    "DEFAULT_PICKSCORE_PROCESSOR", "SCORERS", "SCORER_NAMES", "CLIPScorer", "ImageLike", "ImageRewardScorer",
    "PickScorer", "Scorer", "ScorerLoadError", "ToyStyleScorer", "describe_missing", "get_scorer",
    "load_image_processor", "one_line", "resolve_device", "to_pil",
]


def get_scorer(name: str, model: str | None = None, processor: str | None = None, **kwargs: Any) -> Scorer:
    """Build a scorer by name. `model`/`processor` are hub ids or local folders (None: defaults);
    for ImageReward `processor` is the BERT tokenizer folder. Nothing is loaded yet."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(SCORER_NAMES)}")
    return SCORERS[key].build(model, processor, **kwargs)
