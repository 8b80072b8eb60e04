"""TrainConfig: every setting of a training run, its validation, and TrainingError.

Messages name settings by field (``{learning_rate}``), never by a command-line flag: the CLI
renders them as flags (``--lr``), the API as its JSON field names (``styleinject.errors``).
Fields marked ``resume_fixed`` must match the run that wrote a checkpoint for it to resume.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields

from styleinject.adapters.config import StyleInjectConfig
from styleinject.errors import FieldError
from styleinject.names import DISTILL_TEXT_MODES, MIXED_PRECISIONS, TRAIN_KINDS
from styleinject.train.data import MAX_EXTRACT_BYTES, MAX_EXTRACT_FILES

CONFIG_RECORD = "train_config.json"


class TrainingError(FieldError):
    """A run that cannot start or continue; the message says what to change (fields by name)."""


def _fixed(default=None, **kwargs):
    """A field a resumed run must share with the run that wrote the checkpoint."""
    if "default_factory" not in kwargs:
        kwargs["default"] = default
    return field(metadata={"resume_fixed": True}, **kwargs)



@dataclass
class TrainConfig:
    kind: str = field(metadata={"resume_fixed": True})
    base_model: str = field(metadata={"resume_fixed": True})
    data: str
    output_dir: str
    steps: int = 1000
    resolution: int | None = _fixed(None)  # None: the base model's native size (native_resolution)
    batch_size: int = _fixed(1)
    gradient_accumulation_steps: int = _fixed(1)
    learning_rate: float = _fixed(1e-4)
    lr_warmup_steps: int = _fixed(0)  # linear warm-up, then constant
    adam_beta1: float = _fixed(0.9)
    adam_beta2: float = _fixed(0.999)
    adam_weight_decay: float = _fixed(1e-2)
    adam_epsilon: float = _fixed(1e-8)
    max_grad_norm: float = _fixed(1.0)
    seed: int = _fixed(0)
    mixed_precision: str = "no"  # one of MIXED_PRECISIONS
    gradient_checkpointing: bool = False
    snr_gamma: float | None = _fixed(None)  # min-SNR weighting (5.0 is the paper's value); None = off
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # 0 keeps all
    resume: str | None = None  # None | "latest" | a checkpoint folder
    validation_every: int = 0  # 0 = off
    validation_prompts: list[str] = field(default_factory=list)  # empty: the data's first captions (validation.py)
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])  # one grid column each, fixed for the run
    checkpoint_samples: bool = False  # render the validation grid into every checkpoint (samples.png)
    validation_guidance_scale: float | None = None  # None: the base model's (generation_defaults.json; else 7.5)
    sample_steps: int = 30  # Euler Ancestral steps for validation, teacher samples, class images
    guidance_scale: float = 7.5
    center_crop: bool = _fixed(True)
    random_flip: bool = _fixed(False)
    skip_bad: bool = False
    max_dataset_bytes: int = MAX_EXTRACT_BYTES
    max_dataset_files: int = MAX_EXTRACT_FILES
    adapter: StyleInjectConfig = _fixed(default_factory=StyleInjectConfig)
    adapter_name: str = _fixed("default")
    # distill
    teacher_model: str | None = _fixed(None)
    distill_text: str = _fixed("auto")  # one of DISTILL_TEXT_MODES (auto: unshared iff data has teacher_text)
    feat_kd_weight: float = _fixed(1.0)
    feat_kd_blocks: list[str] = _fixed(default_factory=lambda: ["down_blocks.1", "mid_block", "up_blocks.0"])
    # dreambooth
    instance_prompt: str | None = _fixed(None)
    class_prompt: str | None = _fixed(None)  # set to enable prior preservation
    class_data: str | None = None
    num_class_images: int = _fixed(100)
    prior_loss_weight: float = _fixed(1.0)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["adapter"] = self.adapter.to_dict()
        return json.loads(json.dumps(out))  # JSON-safe copies

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError("unknown TrainConfig fields {unknown}", unknown=unknown)
        adapter = data.get("adapter")
        if isinstance(adapter, dict):
            data["adapter"] = StyleInjectConfig.from_dict(adapter)
        return cls(**data)

    def check(self) -> None:
        """Raise TrainingError naming every bad setting (by field) and the fix."""
        problems: list[TrainingError] = []

        def bad(template: str, **context) -> None:
            problems.append(TrainingError(template, **context))

        if self.kind not in TRAIN_KINDS:
            bad("{kind} {got!r} is not one of {choices}", got=self.kind, choices=", ".join(TRAIN_KINDS))
        if self.steps < 1:
            bad("{steps} must be >= 1 (got {got})", got=self.steps)
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            bad("{resolution} must be a positive multiple of 8 (got {got})", got=self.resolution)
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            bad("{batch_size} and {gradient_accumulation_steps} must be >= 1")
        if not self.learning_rate > 0:
            bad("{learning_rate} must be > 0 (got {got})", got=self.learning_rate)
        if self.mixed_precision not in MIXED_PRECISIONS:
            bad("{mixed_precision} must be no, fp16 or bf16 (got {got!r})", got=self.mixed_precision)
        if self.checkpoint_every < 0 or self.validation_every < 0:
            bad("{checkpoint_every} and {validation_every} must be >= 0")
        if (self.validation_every or self.checkpoint_samples) and not self.validation_seeds:
            bad("{validation_seeds} needs at least one seed to sample the validation prompts with")
        if self.kind == "distill":
            if not self.teacher_model:
                bad("distill needs {teacher_model} (a diffusers pipeline folder or hub id)")
            if self.distill_text not in DISTILL_TEXT_MODES:
                bad("{distill_text} must be auto, shared or unshared (got {got!r})", got=self.distill_text)
        if self.kind == "dreambooth":
            if not self.instance_prompt:
                bad("dreambooth needs {instance_prompt} (e.g. 'a photo of sks dog')")
            if self.class_data and not self.class_prompt:
                bad("{class_data} needs {class_prompt} (e.g. 'a photo of a dog')")
            if self.class_prompt and self.num_class_images < 1:
                bad("{num_class_images} must be >= 1 with {class_prompt}")
        if problems:
            raise TrainingError.joined(problems)


def field_default(cls: type, name: str):
    """The default of a config dataclass field (TrainConfig, StyleInjectConfig): the API schemas and
    the CLI take their defaults from here instead of retyping them. A fresh value per call."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def resume_fixed_fields() -> tuple[str, ...]:
    """TrainConfig fields a resumed run must share with the run that wrote the checkpoint (the
    rest, e.g. steps, checkpoint/validation cadence or mixed precision, may change)."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("resume_fixed"))
