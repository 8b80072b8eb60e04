"""The packaged prompt suite and its selection helpers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from styleinject.eval.prompts import (
    CATEGORIES,
    DEFAULT_SEEDS,
    Prompt,
    PromptFileError,
    as_prompts,
    load_prompts,
    select_prompts,
    suite_path,
)


def test_suite_size_categories_and_uniqueness():
    prompts = load_prompts()
    assert 190 <= len(prompts) <= 210
    counts = Counter(p.category for p in prompts)
    assert set(counts) == set(CATEGORIES) and len(CATEGORIES) == 9
    assert set(counts.values()) == {22}  # balanced: every category weighs the same in "overall"
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({p.text.lower().strip() for p in prompts}) == len(prompts)
    assert all(p.id.startswith(p.category + "-") for p in prompts)
    # short enough for ImageReward's 35 BERT tokens and CLIP's 77
    assert all(3 <= len(p.text.split()) <= 20 and p.text == p.text.strip() for p in prompts)
    assert DEFAULT_SEEDS == (0, 1, 2, 3)
    assert suite_path().name == "prompts.jsonl"


def test_select_by_category_and_first_k():
    prompts = load_prompts()
    animals = select_prompts(prompts, categories=["animals"])
    assert len(animals) == 22 and {p.category for p in animals} == {"animals"}
    assert select_prompts(prompts, categories=["animals"], limit=3) == animals[:3]
    two_each = select_prompts(prompts, per_category=2)
    assert len(two_each) == 18 and set(Counter(p.category for p in two_each).values()) == {2}
    assert select_prompts(prompts, limit=5) == prompts[:5]
    assert select_prompts(limit=1) == prompts[:1]  # default: the packaged suite
    with pytest.raises(ValueError, match="unknown category animal; choose from"):
        select_prompts(prompts, categories=["animal"])
    with pytest.raises(ValueError, match="limit"):
        select_prompts(prompts, limit=0)


def test_user_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# my prompts\na cat\n\na dog\n")
    assert load_prompts(txt) == [Prompt("custom-00", "custom", "a cat"), Prompt("custom-01", "custom", "a dog")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"text": "a cat", "category": "pets"}) + "\n" + json.dumps({"prompt": "a car"}) + "\n")
    assert [p.id for p in load_prompts(jsonl)] == ["pets-00", "custom-00"]
    jsonl.write_text('{"text": "a cat"}\n{"txt": "oops"}\n')
    with pytest.raises(PromptFileError, match=r"p.jsonl:2: expected an object"):
        load_prompts(jsonl)
    jsonl.write_text('{"text": "a", "id": "x"}\n{"text": "b", "id": "x"}\n')
    with pytest.raises(PromptFileError, match="duplicate prompt ids: x"):
        load_prompts(jsonl)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")


def test_as_prompts_mixes_types():
    items = as_prompts(["a", {"text": "b", "category": "c"}, Prompt("z", "k", "t")])
    assert items == [Prompt("custom-00", "custom", "a"), Prompt("c-00", "c", "b"), Prompt("z", "k", "t")]
    with pytest.raises(TypeError):
        as_prompts([3])
