"""A word-level CLIP tokenizer for the toy world.

The byte-level tokenizer of ``styleinject.testing`` (one token per character) is kept as the
fallback, and every word of the toy world's captions (plus the CLIPScore prefix and a few style
words) gets one token through explicit BPE merges, so a tiny text encoder does not have to learn
spelling. It is a plain ``CLIPTokenizer`` (vocab.json + merges.txt) in the diffusers folder format.
"""

from __future__ import annotations

import json
from pathlib import Path

from styleinject.testing import _byte_vocab

from .render import BACKGROUNDS, COLOURS, NUMBER_WORDS, SHAPES, SIZES

MAX_LENGTH = 32
EXTRA_WORDS = ("a", "an", "at", "the", "on", "of", "in", "with", "background", "picture", "drawn",
               "photo", "depicts", "top", "bottom", "left", "right", "center", "style", "pastel",
               "striped", "stripes", "outline", "outlined", "sks", "and", "image")


def toy_words() -> list[str]:
    words = set(EXTRA_WORDS) | set(COLOURS) | set(BACKGROUNDS) | set(SIZES) | set(NUMBER_WORDS.values())
    words |= set(SHAPES) | {s + "s" for s in SHAPES}
    return sorted(words)


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    vocab = _byte_vocab()
    merges: list[str] = []
    seen: set[str] = set()
    for word in toy_words():
        if len(word) < 2:
            continue
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            merge = f"{left} {right}"
            left = left + right
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
            if left not in vocab:
                vocab[left] = len(vocab)
    return vocab, merges


def toy_tokenizer(path: str | Path, model_max_length: int = MAX_LENGTH):
    """Write the toy-world tokenizer to ``path`` and return it (a ``CLIPTokenizer``).

    Left-to-right merges per word can be pre-empted by an earlier merge of another word (the "an"
    inside "orange"), so words that do not come out as one token get extra merges joining the
    pieces the tokenizer produced, until every toy word is a single token.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    for _ in range(10):
        (path / "vocab.json").write_text(json.dumps(vocab))
        (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"),
                                  model_max_length=model_max_length)
        split = {w: tokenizer.tokenize(w) for w in toy_words() if len(w) > 1}
        split = {w: pieces for w, pieces in split.items() if len(pieces) > 1}
        if not split:
            break
        for pieces in split.values():
            left = pieces[0]
            for right in pieces[1:]:
                merges.append(f"{left} {right}")
                left = left + right
                vocab.setdefault(left, len(vocab))
    else:  # pragma: no cover - converges in two or three rounds
        raise RuntimeError(f"toy tokenizer: words still split: {sorted(split)}")
    tokenizer.save_pretrained(str(path))
    return tokenizer
