"""Training engine: fine-tuning, distillation and DreamBooth in one resumable accelerate loop.

``from styleinject.train import TrainConfig, Progress, TrainResult, run_training``; the heavy
imports (accelerate, diffusers) happen on first use, so ``styleinject --help`` stays fast.
Modules: ``config`` (TrainConfig, TrainingError), ``data`` (datasets), ``context`` and ``losses``
(what the kinds share), ``finetune`` / ``distill`` / ``dreambooth`` (the kinds), ``loop``.
"""

from __future__ import annotations

_EXPORTS = {
    "TrainConfig": "styleinject.train.config",
    "TrainingError": "styleinject.train.config",
    "resume_fixed_fields": "styleinject.train.config",
    "Progress": "styleinject.train.loop",
    "TrainResult": "styleinject.train.loop",
    "run_training": "styleinject.train.loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'styleinject.train' has no attribute {name!r}")
