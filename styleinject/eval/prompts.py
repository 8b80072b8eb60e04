"""The evaluation prompt suite: 198 prompts over 9 categories (22 each), 4 fixed seeds.

The suite lives in `prompts.jsonl` next to this file (package data), one JSON object a line:
`{"id": "animals-03", "category": "animals", "text": "an owl perched on a branch at twilight"}`.
Every prompt is generated with the same seeds (DEFAULT_SEEDS), so a base model and an adapter
are compared on identical initial noise: paired samples. docs/evaluation.md explains the choice
of categories.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from styleinject.errors import FieldError

CATEGORIES = (
    "artistic_design",
    "natural_photography",
    "portraits",
    "animals",
    "poetry_proverbs",
    "geometric_patterns",
    "architecture_cities",
    "food_still_life",
    "fantasy_scifi",
)
DEFAULT_SEEDS = (0, 1, 2, 3)
CUSTOM_CATEGORY = "custom"


class PromptFileError(FieldError):
    """A prompt file is missing or malformed; the message names the file and the line."""


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def suite_path() -> Path:
    """Path of the packaged prompt suite."""
    return Path(str(resources.files("styleinject.eval") / "prompts.jsonl"))


def load_prompts(path: str | Path | None = None) -> list[Prompt]:
    """Load the packaged suite (path=None) or a user file.

    `.jsonl`: one object a line with "text" (or "prompt"), optional "category" and "id".
    Any other suffix: plain text, one prompt a line; blank lines and lines starting with # are
    skipped. Prompts without a category get "custom"; without an id, "<category>-<index>".
    """
    path = suite_path() if path is None else Path(path)
    if not path.is_file():
        raise PromptFileError.text(f"prompt file not found: {path}")
    rows: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or (path.suffix != ".jsonl" and line.startswith("#")):
                continue
            if path.suffix != ".jsonl":
                rows.append({"text": line})
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptFileError.text(f"{path}:{number}: not valid JSON ({error.msg})") from error
            text = obj.get("text", obj.get("prompt")) if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise PromptFileError.text(f'{path}:{number}: expected an object with a non-empty "text"')
            rows.append({"id": obj.get("id"), "category": obj.get("category"), "text": text.strip()})
    if not rows:
        raise PromptFileError.text(f"{path}: no prompts in the file")
    try:
        return as_prompts(rows)
    except ValueError as error:
        raise PromptFileError.text(f"{path}: {error}") from error


def select_prompts(
    prompts: Sequence[Prompt] | None = None,
    *,
    categories: Iterable[str] | None = None,
    limit: int | None = None,
    per_category: int | None = None,
) -> list[Prompt]:
    """Subset in file order: keep `categories` (all if None), then the first `per_category` of
    each category, then the first `limit` overall. Unknown categories raise ValueError."""
    prompts = load_prompts() if prompts is None else list(prompts)
    if categories is not None:
        wanted = list(dict.fromkeys(categories))
        present = list(dict.fromkeys(p.category for p in prompts))
        unknown = [c for c in wanted if c not in present]
        if unknown:
            raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"choose from {', '.join(present)}")
        prompts = [p for p in prompts if p.category in wanted]
    if per_category is not None:
        if per_category < 1:
            raise ValueError("per_category must be >= 1")
        counts: dict[str, int] = {}
        kept = []
        for p in prompts:
            if counts.get(p.category, 0) < per_category:
                counts[p.category] = counts.get(p.category, 0) + 1
                kept.append(p)
        prompts = kept
    if limit is not None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        prompts = prompts[:limit]
    return prompts


def as_prompts(items: Iterable[Prompt | str | dict]) -> list[Prompt]:
    """Normalise a list of Prompt objects, plain strings or {"text", "category"?, "id"?} dicts."""
    out: list[Prompt] = []
    counters: dict[str, int] = {}
    for item in items:
        if isinstance(item, Prompt):
            out.append(item)
            continue
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise TypeError(f"expected a Prompt, a string or a dict with 'text', got {item!r}")
        category = str(item.get("category") or CUSTOM_CATEGORY)
        index = counters.get(category, 0)
        counters[category] = index + 1
        given = item.get("id")
        out.append(Prompt(str(given) if given is not None else f"{category}-{index:02d}", category, item["text"]))
    ids = [p.id for p in out]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate prompt ids: {', '.join(duplicates)}")
    return out
