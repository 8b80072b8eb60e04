"""StyleInjectConfig: which layers get an adapter and how big it is, saved as JSON beside the weights."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from styleinject.errors import FieldError
from styleinject.names import A_INITS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = "1"  # of the weights file; its header says "styleinject_format_version"
ADAPTER_TYPE = "styleinject"
# The fields each named preset fixes (keys: styleinject.names.ADAPTER_PRESETS, a test checks they
# agree); every other field keeps its value. "paper-text" is the field defaults, the paper's text.
PRESET_FIELDS: dict[str, dict] = {
    "paper-text": {},
    "paper-counts": {"target_modules": ["to_q", "to_v"], "style_modules": ["to_q", "to_v"],
                     "keep_router": True, "sta_bias": True},
}


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
    plain low rank on ``to_v``, as its text describes. ``StyleInjectConfig.paper_counts(n)`` is the
    placement that reproduces the paper's parameter counts instead (docs/adapters.md explains the
    contradiction); ``StyleInjectConfig.lora(...)`` is the LoRA baseline.

    ``keep_router`` keeps a style router on styled layers even at n = 1 (a softmax over one logit
    is 1, so it changes nothing and gets no gradient: it exists only to match the paper's counts).
    ``sta_bias`` gives STA's hypernetwork G a bias (zero at init; redundant, since s sums to 1).
    ``a_init`` sets the scale of each A_i at init: ``"lora"`` draws every A_i like a LoRA A, so
    with a near-uniform router the initial mixture sum_i s_i A_i is ~1/sqrt(n) the size of a LoRA
    A; ``"mixture"`` multiplies each A_i by sqrt(n), so a uniform router's initial mixture has a
    LoRA A's scale. These three are left out of the JSON at their defaults.

    ``rank_pattern`` / ``alpha_pattern`` (PEFT's names) give single modules another rank / alpha
    than ``rank`` (``conv_rank``) and ``alpha`` (``conv_alpha``): ``{pattern: value}``, matched like
    ``target_modules``, first match wins. LoRA files imported from other tools use them, since their
    ranks and alphas may differ per module. Empty (the default), they are left out of the JSON.
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
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    keep_router: bool = False
    sta_bias: bool = False
    a_init: str = "lora"  # one of A_INITS

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
        self.rank_pattern = {str(k): int(v) for k, v in dict(self.rank_pattern).items()}
        self.alpha_pattern = {str(k): float(v) for k, v in dict(self.alpha_pattern).items()}
        problems = []
        if self.rank < 1 or self.conv_rank < 1 or any(v < 1 for v in self.rank_pattern.values()):
            problems.append(f"rank, conv_rank and rank_pattern values must be >= 1 (got {self.rank}, "
                            f"{self.conv_rank}, {sorted(set(self.rank_pattern.values()))})")
        if self.num_styles < 1:
            problems.append(f"num_styles must be >= 1 (got {self.num_styles}); use 1 for plain low rank")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.a_init not in A_INITS:
            problems.append(f"a_init must be one of {', '.join(A_INITS)} (got {self.a_init!r})")
        if not self.target_modules and not self.conv_target_modules:
            problems.append("no target modules: set target_modules and/or conv_target_modules")
        for pattern in [*self.target_modules, *self.style_modules, *self.conv_target_modules,
                        *self.rank_pattern, *self.alpha_pattern]:
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

    @classmethod
    def from_preset(cls, preset: str, **fields) -> StyleInjectConfig:
        """The named preset (``PRESET_FIELDS``) with every field it does not fix set by ``fields``;
        a field it fixes may only be given with the preset's value."""
        if preset not in PRESET_FIELDS:
            raise FieldError("{preset} must be one of {choices} (got {got!r})",
                             choices=", ".join(PRESET_FIELDS), got=preset)
        fixed = PRESET_FIELDS[preset]
        clash = [name for name in fixed if name in fields and fields[name] != fixed[name]]
        if clash:
            raise FieldError("{preset} %s sets %s; leave %s out" % (  # preset: a known name, no braces
                preset, " and ".join("{%s}" % name for name in clash), "it" if len(clash) == 1 else "them"))
        return cls(**{**fields, **fixed})

    @classmethod
    def paper_counts(cls, num_styles: int = 16, **overrides) -> StyleInjectConfig:
        """The placement that reproduces the paper's counts on SD 1.5 (3.34 / 8.41 / 28.70 M for
        n = 1 / 4 / 16 at r = 32): DMA + STA on both ``to_q`` and ``to_v``, a router kept at n = 1
        and a bias on G. The paper's text puts plain LoRA on ``to_v`` (the field defaults follow
        the text); docs/adapters.md derives the counts. ``overrides``: any other field."""
        return cls(num_styles=num_styles, **{**PRESET_FIELDS["paper-counts"], **overrides})

    # -- which layer gets what -------------------------------------------------------------

    def targets_linear(self, name: str) -> bool:
        return _matches(name, self.target_modules)

    def targets_conv(self, name: str) -> bool:
        return _matches(name, self.conv_target_modules)

    def layer_options(self, name: str, conv: bool) -> dict:
        """Rank, style count, STA flag and scale for the module called ``name``."""
        styled = _matches(name, self.style_modules)
        rank, alpha = self.rank_alpha(name, conv)
        return {
            "rank": rank,
            "num_styles": self.num_styles if styled and self.dma else 1,
            "sta": styled and self.sta,
            "scale": alpha / rank,
            "dropout": self.dropout,
            "router": styled and self.dma and self.keep_router,  # a router even at n = 1
            "sta_bias": styled and self.sta and self.sta_bias,
            "a_init": self.a_init,
        }

    def rank_alpha(self, name: str, conv: bool) -> tuple[int, float]:
        """Rank and alpha of the module called ``name`` (``rank_pattern`` / ``alpha_pattern`` first)."""
        rank = _lookup(name, self.rank_pattern, self.conv_rank if conv else self.rank)
        alpha = _lookup(name, self.alpha_pattern, self.conv_alpha if conv else self.alpha)
        return rank, alpha

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in ("rank_pattern", "alpha_pattern"):  # absent when unused: older readers keep working
            if not data[name]:
                del data[name]
        for name, default in _OMITTED_AT_DEFAULT.items():  # likewise
            if data[name] == default:
                del data[name]
        return {"adapter_type": ADAPTER_TYPE, **data}

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


_OMITTED_AT_DEFAULT = {"keep_router": False, "sta_bias": False, "a_init": "lora"}


def _matches(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        if re.fullmatch(pattern, name):
            return True
    return False


def _lookup(name: str, patterns: dict, default):
    for pattern, value in patterns.items():
        if _matches(name, [pattern]):
            return value
    return default
