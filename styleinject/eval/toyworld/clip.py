"""A small CLIP trained contrastively on toy-world scene/caption pairs, so CLIPScore is real there.

``transformers.CLIPModel`` with a tiny config (ViT 32x32 / patch 4, 3 layers of width 64; text
encoder 2 layers of width 64 over the word-level toy tokenizer), symmetric InfoNCE loss with a
learned temperature. Half of the training captions carry CLIPScore's prefix "A photo depicts ",
30% of the images are in a target style, and images get the checker's blur/noise jitter. Saved
with ``save_pretrained`` + tokenizer + ``preprocessor_config.json``, i.e. the folder
``styleinject.eval.scorers.CLIPScorer(model=PATH)`` loads.

    python -m styleinject.eval.toyworld.clip --out models/toy-clip

Reported: retrieval recall@1 within random groups of 100 held-out pairs (image->text, text->image)
and "swap" accuracy: how often the true caption scores above the same caption with the colour
(or shape, or count) replaced.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checker import _augment
from .render import COLOURS, NUMBER_WORDS, SHAPES, Scene, caption, render, scene_at
from .styles import STYLES, apply_style
from .text import MAX_LENGTH, toy_tokenizer

TRAIN_SEED, TEST_SEED = 20, 21
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREFIX = "A photo depicts "


def build_clip(path: Path, seed: int = 0, width: int = 64):
    from transformers import CLIPConfig, CLIPModel

    tok = toy_tokenizer(path)
    v = len(tok)
    text = {"vocab_size": v, "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": 2,
                "num_attention_heads": 4, "max_position_embeddings": MAX_LENGTH, "projection_dim": width,
                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"image_size": 32, "patch_size": 4, "hidden_size": width, "intermediate_size": 4 * width,
                  "num_hidden_layers": 3, "num_attention_heads": 4, "projection_dim": width}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))
    preprocessor = {"crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_normalize": True,
                    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                    "do_convert_rgb": True, "image_processor_type": "CLIPImageProcessor",
                    "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3, "size": {"shortest_edge": 32}}
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return model, tok


def pixel_values(images) -> torch.Tensor:
    """32x32 PIL images -> CLIP-normalised tensors (what the image processor gives for 32x32 input)."""
    a = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]))
    x = a.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def make_pairs(n: int, seed: int, styled: float = 0.3):
    rng = np.random.default_rng(seed + 7)
    scenes = [scene_at(seed, i) for i in range(n)]
    images = []
    for s in scenes:
        style = STYLES[rng.integers(len(STYLES))] if rng.random() < styled else None
        images.append(apply_style(render(s), style))
    return images, scenes


def swapped(scene: Scene, attribute: str, rng: random.Random) -> str:
    """The caption of ``scene`` with one attribute replaced by a different value."""
    d = scene.to_dict()
    if attribute == "colour":
        d["colour"] = rng.choice([c for c in COLOURS if c != scene.colour])
    elif attribute == "shape":
        d["shape"] = rng.choice([s for s in SHAPES if s != scene.shape])
    else:  # count: keep the sentence well formed (position only for one object)
        d["count"] = rng.choice([c for c in NUMBER_WORDS if c != scene.count])
        if d["count"] == 1:
            d["position"] = "center"
    return caption(Scene.from_dict(d))


@torch.no_grad()
def embed(model, tok, images=None, texts=None, batch: int = 256):
    out = []
    if images is not None:
        x = pixel_values(images)
        for i in range(0, len(x), batch):
            out.append(F.normalize(_feats(model.get_image_features(pixel_values=x[i:i + batch])), dim=-1))
    else:
        for i in range(0, len(texts), batch):
            t = tok(texts[i:i + batch], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt")
            out.append(F.normalize(_feats(model.get_text_features(input_ids=t.input_ids,
                                                                  attention_mask=t.attention_mask)), dim=-1))
    return torch.cat(out)


def _feats(o):
    return o if isinstance(o, torch.Tensor) else o.pooler_output


def evaluate_clip(model, tok, n: int = 1000, group: int = 100) -> dict[str, float]:
    model.eval()
    images, scenes = make_pairs(n, TEST_SEED, styled=0.0)
    texts = [PREFIX + caption(s) for s in scenes]
    ie, te = embed(model, tok, images=images), embed(model, tok, texts=texts)
    i2t = t2i = 0
    for g in range(0, n, group):
        sim = ie[g:g + group] @ te[g:g + group].T
        ar = torch.arange(sim.shape[0])
        i2t += int((sim.argmax(1) == ar).sum())
        t2i += int((sim.argmax(0) == ar).sum())
    res = {f"recall@1_i2t_of_{group}": i2t / n, f"recall@1_t2i_of_{group}": t2i / n}
    rng = random.Random(0)
    true = (ie * te).sum(-1)
    for attr in ("colour", "shape", "count"):
        other = embed(model, tok, texts=[PREFIX + swapped(s, attr, rng) for s in scenes])
        res[f"swap_{attr}"] = float((true > (ie * other).sum(-1)).float().mean())
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the toy-world CLIP (for CLIPScore on the toy world).")
    p.add_argument("--out", default="models/toy-clip")
    p.add_argument("--n-train", type=int, default=30000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = build_clip(out, a.seed)
    images, scenes = make_pairs(a.n_train, TRAIN_SEED)
    x = pixel_values(images)
    caps = [caption(s) for s in scenes]
    ids_plain = tok(caps, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    ids_pref = tok([PREFIX + c for c in caps], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                   return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(a.seed)
    model.train()
    for step in range(a.steps):
        warm = min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = a.lr * warm * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        idx = torch.randint(0, len(x), (a.batch_size,), generator=g)
        pref = torch.rand(a.batch_size, generator=g) < 0.5
        input_ids = torch.where(pref[:, None], ids_pref.input_ids[idx], ids_plain.input_ids[idx])
        mask = torch.where(pref[:, None], ids_pref.attention_mask[idx], ids_plain.attention_mask[idx])
        # the checker's jitter works in [-1, 1]; CLIP's normalisation is close enough to reuse it
        out_ = model(input_ids=input_ids, attention_mask=mask, pixel_values=_augment(x[idx], g))
        labels = torch.arange(a.batch_size)
        # duplicate captions in a batch are not negatives of each other
        same = input_ids[:, None, :].eq(input_ids[None, :, :]).all(-1) & ~torch.eye(a.batch_size, dtype=torch.bool)
        logits = out_.logits_per_image.masked_fill(same, -1e4)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == a.steps - 1:
            print(f"clip step {step}/{a.steps} loss {loss.item():.4f}", flush=True)
    model.eval()
    model.save_pretrained(out)
    metrics = evaluate_clip(model, tok, n=a.n_test)
    metrics["train_s"] = round(time.time() - t0, 1)
    metrics["command"] = "python -m styleinject.eval.toyworld.clip " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "clip_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
