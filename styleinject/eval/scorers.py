"""Image-text scorers: CLIPScore, PickScore (this file) and ImageReward (imagereward.py).

Every scorer loads its weights lazily, on the first `score()` call (or an explicit `load()`),
from a hub id or a local folder: importing this module never touches the disk or the network.
Scores are computed under `torch.no_grad()` in eval mode, in batches, on the chosen device, and
are deterministic for fixed inputs. Conventions (docs/evaluation.md has the full derivation):

    CLIPScore  = 100 * w * max(cos(E_I(image), E_T("A photo depicts " + prompt)), 0),  w = 2.5
    PickScore  = exp(logit_scale) * cos(E_I(image), E_T(prompt)) - 21.0
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

ImageLike = Any  # PIL.Image.Image, a path to an image file, or an HxWx3 uint8 numpy array


class ScorerLoadError(RuntimeError):
    """The weights of a scorer could not be loaded; the message says what to pass instead."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_pil(image: ImageLike):
    """Return an RGB PIL image from a PIL image, a file path or an HxWx3 uint8 array."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        import numpy as np

        if isinstance(image, np.ndarray):
            return Image.fromarray(image).convert("RGB")
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    raise TypeError(f"expected a PIL image, a path or a numpy array, got {type(image).__name__}")


def _features(output: Any) -> torch.Tensor:
    """`get_{image,text}_features` returns a tensor in transformers 4 and a ModelOutput whose
    `pooler_output` holds the projected embedding in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_image_processor(path: str):
    """CLIP-style image processor with the PIL backend (the bicubic PIL resize the original CLIP,
    CLIPScore and PickScore code used), whether or not torchvision is installed."""
    import transformers
    from transformers import AutoImageProcessor

    major = int(transformers.__version__.split(".")[0])
    kwargs = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    return AutoImageProcessor.from_pretrained(path, **kwargs)


def one_line(error: BaseException, limit: int = 300) -> str:
    """The error's message on one line, shortened: library messages can span many lines."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_missing(what: str, path: str, flag: str, error: Exception) -> ScorerLoadError:
    where = "local folder" if Path(path).exists() else "hub id or local folder"
    return ScorerLoadError(
        f"could not load the {what} from {path!r} ({where}): {type(error).__name__}: {one_line(error)}. "
        f"Pass {flag} with a local folder holding config.json, the weights, the tokenizer files and "
        f"preprocessor_config.json (on a machine with network: `hf download <hub id> --local-dir DIR`)."
    )


class Scorer:
    """Base class: lazy loading, batching, no_grad, device handling.

    Subclasses set `name` and implement `_load()` and `_score_batch(pil_images, prompts)`.
    """

    name: str = ""
    higher_is_better: bool = True

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self._loaded = False

    # -- loading --------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> Scorer:
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def _load(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- scoring --------------------------------------------------------------------------------
    def score(self, images: Sequence[ImageLike], prompts: Sequence[str] | str) -> list[float]:
        """One score per (image, prompt) pair; a single prompt string is used for every image."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        self.load()
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch_images = [to_pil(im) for im in images[start : start + self.batch_size]]
                batch_prompts = list(prompts[start : start + self.batch_size])
                scores.extend(self._score_batch(batch_images, batch_prompts).float().cpu().tolist())
        return scores

    def _score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-safe description written into reports (name, weights, formula)."""
        return {"name": self.name}


class _CLIPScorerBase(Scorer):
    """Shared loading and embedding code for CLIP-architecture scorers."""

    _flag = "--clip-model"
    _what = "CLIP model"

    def __init__(self, model: str, processor: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_path = str(model)
        self.processor_path = str(processor) if processor is not None else self.model_path
        self.model = None
        self.tokenizer = None
        self.image_processor = None

    def _load(self) -> None:
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(self.model_path)
        except (OSError, ValueError) as error:
            raise _describe_missing(self._what, self.model_path, self._flag, error) from error
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.processor_path)
            self.image_processor = load_image_processor(self.processor_path)
        except (OSError, ValueError) as error:
            flag = "--pickscore-processor" if self.processor_path != self.model_path else self._flag
            raise _describe_missing(f"{self._what} processor", self.processor_path, flag, error) from error
        self.model = model.to(device=self.device, dtype=self.dtype).eval()

    def _max_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)  # 77 for every CLIP

    @torch.no_grad()
    def cosine(self, images: list, prompts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its own prompt (text taken as given)."""
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        text = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self._max_length(), return_tensors="pt"
        )
        image_embeds = _features(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)))
        text_embeds = _features(
            self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
            )
        )
        image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
        return (image_embeds * text_embeds).sum(dim=-1)


class CLIPScorer(_CLIPScorerBase):
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


class PickScorer(_CLIPScorerBase):
    """PickScore (Kirstain et al., 2023, "Pick-a-Pic"): the CLIP-H model fine-tuned on human
    preferences, scored as its own logit, exp(logit_scale) * cos(image, prompt), then offset by
    -21.0 as the StyleInject paper reports it (so typical SD 1.5 samples land around 0..1.5).
    No prompt prefix, no clamp. The processor is LAION's CLIP-ViT-H-14, as in the official code.
    """

    name = "pickscore"
    _flag = "--pickscore-model"
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


SCORER_NAMES = ("clipscore", "pickscore", "imagereward")


def get_scorer(name: str, model: str | None = None, processor: str | None = None, **kwargs: Any) -> Scorer:
    """Build a scorer by name. `model`/`processor` are hub ids or local folders (None: defaults);
    for ImageReward `processor` is the BERT tokenizer folder. Nothing is loaded yet."""
    key = name.lower().replace("-", "").replace("_", "")
    if key == "clipscore":
        if processor is not None:
            kwargs["processor"] = processor
        return CLIPScorer(model or DEFAULT_CLIP_MODEL, **kwargs)
    if key == "pickscore":
        return PickScorer(model or DEFAULT_PICKSCORE_MODEL, processor or DEFAULT_PICKSCORE_PROCESSOR, **kwargs)
    if key == "imagereward":
        from styleinject.eval.imagereward import DEFAULT_IMAGEREWARD_TOKENIZER, ImageRewardScorer

        return ImageRewardScorer(model, tokenizer=processor or DEFAULT_IMAGEREWARD_TOKENIZER, **kwargs)
    raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(SCORER_NAMES)}")
