"""Toy world: renderer, captions, styles, dataset writer, tokenizer (all tiny and fast)."""

from __future__ import annotations

import numpy as np
import pytest

from styleinject.eval.toyworld.dataset import read_scenes, write_dataset
from styleinject.eval.toyworld.render import (
    BACKGROUNDS,
    COLOURS,
    NUMBER_WORDS,
    Scene,
    caption,
    render_array,
    scene_at,
)
from styleinject.eval.toyworld.styles import STYLES, apply_style
from styleinject.eval.toyworld.text import toy_tokenizer, toy_words
from styleinject.train.data import inspect_dataset


def test_render_is_deterministic():
    a, b = scene_at(3, 5), scene_at(3, 5)
    assert a == b
    assert np.array_equal(render_array(a), render_array(b))
    assert render_array(a).shape == (32, 32, 3)
    assert render_array(a, 64).shape == (64, 64, 3)
    assert not np.array_equal(render_array(a), render_array(scene_at(3, 6)))
    assert Scene.from_dict(a.to_dict()) == a


def test_caption_matches_attributes():
    for i in range(40):
        s = scene_at(0, i)
        text = caption(s)
        assert f" {s.colour} " in f" {text} "
        assert s.background in text and s.size in text
        if s.count == 1:
            assert f" {s.shape} " in f" {text} " and s.position in text
        else:
            assert text.startswith(NUMBER_WORDS[s.count]) or f"of {NUMBER_WORDS[s.count]} " in text
            assert f"{s.shape}s" in text
        assert len(s.centres) == s.count


def test_pinned_attributes_and_pixels():
    s = scene_at(0, 1, shape="circle", colour="blue", count=1, size="large", background="white",
                 position="center")
    a = render_array(s).astype(int)
    assert s.position == "center" and s.count == 1
    assert np.abs(a[16, 16] - np.array(COLOURS["blue"])).sum() < 10        # object at the centre
    assert np.abs(a[0, 0] - np.array(BACKGROUNDS["white"])).sum() < 10      # background in the corner


def test_styles_are_deterministic_and_change_the_image():
    from styleinject.eval.toyworld.render import render

    im = render(scene_at(0, 2))
    for style in STYLES:
        out = np.asarray(apply_style(im, style))
        assert np.array_equal(out, np.asarray(apply_style(im, style)))
        assert not np.array_equal(out, np.asarray(im))
    assert apply_style(im, None) is im
    with pytest.raises(ValueError, match="unknown style"):
        apply_style(im, "cubism")


def test_dataset_loads_with_the_training_engine(tmp_path):
    out = write_dataset(tmp_path / "ds", 5, seed=0, style="stripes")
    info = inspect_dataset(out, kind="finetune")
    assert info.num_items == 5
    scenes = read_scenes(out)
    assert [r["file_name"] for r in scenes] == [f"{i:06d}.png" for i in range(5)]
    assert (out / "000003.txt").read_text().strip() == caption(Scene.from_dict(
        {k: v for k, v in scenes[3].items() if k != "file_name"}))


def test_toy_tokenizer_one_token_per_word(tmp_path):
    from transformers import AutoTokenizer

    toy_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for word in toy_words():
        assert len(tok(word).input_ids) == 3, word   # <bos> word <eos>
    assert len(tok("xyzzy").input_ids) > 3            # unknown words fall back to characters


def test_loss_plot(tmp_path):
    from PIL import Image

    from styleinject.eval.toyworld.plot import line_plot, read_log

    log = tmp_path / "run.log"
    log.write_text("[ 1.0s] step 50/100 loss 0.5 lr 1e-3\n[ 2.0s] saved x\n[ 3.0s] step 100/100 loss 0.25 lr 1e-3\n")
    steps, losses = read_log(log, smooth=1)
    assert steps == [50.0, 100.0] and losses == [0.5, 0.25]
    out = line_plot({"run": (steps, losses)}, tmp_path / "p.png", "t")
    assert Image.open(out).size == (640, 360)
