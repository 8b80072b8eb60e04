"""Training engine: fine-tuning, distillation and DreamBooth in one resumable accelerate loop.

``from styleinject.train import TrainConfig, Progress, TrainResult, run_training``; the heavy
imports (accelerate, diffusers) happen on first use, so ``styleinject --help`` stays fast.
"""

from __future__ import annotations

__all__ = ["Progress", "TrainConfig", "TrainResult", "TrainingError", "run_training"]


def __getattr__(name: str):
    if name in __all__:
        from styleinject.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'styleinject.train' has no attribute {name!r}")
