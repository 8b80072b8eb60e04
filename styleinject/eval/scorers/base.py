"""Scorer base class and the helpers every scorer shares (device, images, CLIP loading, errors)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from styleinject.errors import FieldError

ImageLike = Any  # PIL.Image.Image, a path to an image file, or an HxWx3 uint8 numpy array


class ScorerLoadError(FieldError, RuntimeError):
    """The weights of a scorer could not be loaded; the message names the option to set by field
    (``{clip_model}``, ``{pickscore_processor}``...: the CLI writes them as flags)."""


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


def describe_missing(what: str, path: str, field: str, error: Exception) -> ScorerLoadError:
    """ScorerLoadError for weights that did not load; ``field`` names the option that sets them."""
    where = "local folder" if Path(path).exists() else "hub id or local folder"
    return ScorerLoadError(
        "could not load the {what} from {path!r} ({where}): {error_type}: {cause}. Pass {" + field + "} with a "
        "local folder holding config.json, the weights, the tokenizer files and preprocessor_config.json "
        "(on a machine with network, {hint} prints the folder it fetched)",
        what=what, path=path, where=where, error_type=type(error).__name__, cause=one_line(error),
        hint="`hf download <hub id>`")


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


class CLIPScorerBase(Scorer):
    """Shared loading and embedding code for CLIP-architecture scorers."""

    # option fields that set the weights (CLI: --clip-model...; API: STYLEINJECT_SCORER_PATHS keys)
    _model_field = "clip_model"
    _processor_field = "clip_model"
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
            raise describe_missing(self._what, self.model_path, self._model_field, error) from error
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.processor_path)
            self.image_processor = load_image_processor(self.processor_path)
        except (OSError, ValueError) as error:
            field = self._processor_field if self.processor_path != self.model_path else self._model_field
            raise describe_missing(f"{self._what} processor", self.processor_path, field, error) from error
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
