"""Evaluation: prompt suite, CLIPScore / PickScore / ImageReward scorers, and the eval runner.

Attributes are imported lazily so that `styleinject.eval.cli` (imported to build `--help`) stays
light; `from styleinject.eval import evaluate_adapter` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate_adapter": "styleinject.eval.runner",
    "write_report": "styleinject.eval.runner",
    "Prompt": "styleinject.eval.prompts",
    "CATEGORIES": "styleinject.eval.prompts",
    "DEFAULT_SEEDS": "styleinject.eval.prompts",
    "load_prompts": "styleinject.eval.prompts",
    "select_prompts": "styleinject.eval.prompts",
    "Scorer": "styleinject.eval.scorers",
    "ScorerLoadError": "styleinject.eval.scorers",
    "CLIPScorer": "styleinject.eval.scorers",
    "PickScorer": "styleinject.eval.scorers",
    "get_scorer": "styleinject.eval.scorers",
    "ImageRewardScorer": "styleinject.eval.scorers",
    "SCORERS": "styleinject.eval.scorers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'styleinject.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
