"""StyleInjectConfig: which layers get an adapter and how big it is, saved as JSON beside the weights."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
ADAPTER_TYPE = "styleinject"


@dataclass
class StyleInjectConfig:
    """Shape of one StyleInject adapter.

    Every module matched by ``target_modules`` (``nn.Linear``) or ``conv_target_modules``
    (``nn.Conv2d``) gets a low-rank update ``scale * B A x`` with ``scale = alpha / rank``.
    Modules that also match ``style_modules`` get StyleInject proper: ``num_styles`` down-projections
    mixed by a softmax style router (DMA, switch ``dma``) and the AdaIN variance rescaling (STA,
    switch ``sta``). Matching: an entry equals the module's qualified name or its last dotted
    components (``"to_q"`` matches ``...attn1.to_q``), or is a regular expression that fully
    matches the qualified name.

    The paper's defaults are the field defaults: r = 32, n = 16, alpha = r, DMA+STA on ``to_q``,
    plain low rank on ``to_v``. ``StyleInjectConfig.lora(...)`` is the LoRA baseline.
    """

    rank: int = 32
    num_styles: int = 16
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_v"])
    style_modules: list[str] = field(default_factory=lambda: ["to_q"])
    conv_target_modules: list[str] = field(default_factory=list)
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dma: bool = True
    sta: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.conv_rank is None:
            self.conv_rank = self.rank
        if self.conv_alpha is None:  # like PEFT's one lora_alpha for every rank
            self.conv_alpha = self.alpha
        self.alpha = float(self.alpha)
        self.conv_alpha = float(self.conv_alpha)
        for name in ("target_modules", "style_modules", "conv_target_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            else:
                setattr(self, name, list(value))
        problems = []
        if self.rank < 1 or self.conv_rank < 1:
            problems.append(f"rank and conv_rank must be >= 1 (got {self.rank}, {self.conv_rank})")
        if self.num_styles < 1:
            problems.append(f"num_styles must be >= 1 (got {self.num_styles}); use 1 for plain low rank")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if not self.target_modules and not self.conv_target_modules:
            problems.append("no target modules: set target_modules and/or conv_target_modules")
        for pattern in self.target_modules + self.style_modules + self.conv_target_modules:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"module pattern {pattern!r} is not a valid regular expression: {exc}")
        if problems:
            raise ValueError("invalid StyleInjectConfig: " + "; ".join(problems))

    @classmethod
    def lora(cls, rank: int = 32, alpha: float | None = None, target_modules=("to_q", "to_v"),
             conv_target_modules=(), dropout: float = 0.0) -> StyleInjectConfig:
        """Plain LoRA (n = 1, no router, no STA): the baseline, numerically equal to PEFT LoRA."""
        return cls(rank=rank, num_styles=1, alpha=alpha, target_modules=list(target_modules),
                   style_modules=[], conv_target_modules=list(conv_target_modules), dma=False,
                   sta=False, dropout=dropout)

    # -- which layer gets what -------------------------------------------------------------

    def targets_linear(self, name: str) -> bool:
        return _matches(name, self.target_modules)

    def targets_conv(self, name: str) -> bool:
        return _matches(name, self.conv_target_modules)

    def layer_options(self, name: str, conv: bool) -> dict:
        """Rank, style count, STA flag and scale for the module called ``name``."""
        styled = _matches(name, self.style_modules)
        rank = self.conv_rank if conv else self.rank
        alpha = self.conv_alpha if conv else self.alpha
        return {
            "rank": rank,
            "num_styles": self.num_styles if styled and self.dma else 1,
            "sta": styled and self.sta,
            "scale": alpha / rank,
            "dropout": self.dropout,
        }

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"adapter_type": ADAPTER_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> StyleInjectConfig:
        data = dict(data)
        kind = data.pop("adapter_type", ADAPTER_TYPE)
        if kind != ADAPTER_TYPE:
            raise ValueError(f"not a StyleInject adapter config (adapter_type={kind!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown StyleInjectConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> StyleInjectConfig:
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: is {directory} an adapter folder written by "
                                    "save_adapter?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None


def _matches(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        if re.fullmatch(pattern, name):
            return True
    return False
