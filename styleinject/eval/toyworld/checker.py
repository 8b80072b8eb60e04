"""Attribute checker: a small CNN that reads shape, colour, count and style off a toy-world image.

Used to measure prompt alignment of generated images ("does the model draw two red circles when
asked for two red circles"). Trained on rendered scenes of world seed ``TRAIN_SEED`` (plain and in
every target style, with blur / noise / brightness jitter so decoded VAE outputs are in-domain);
accuracy is reported on held-out scenes of world seed ``TEST_SEED``. Saved as
``checker.safetensors`` + ``checker_config.json``.

    python -m styleinject.eval.toyworld.checker --out models/toy-checker
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .render import COLOURS, COUNTS, DEFAULT_RESOLUTION, SHAPES, Scene, render, scene_at
from .styles import STYLES, apply_style

TRAIN_SEED, TEST_SEED = 10, 11
HEADS = {"shape": list(SHAPES), "colour": list(COLOURS), "count": [str(c) for c in COUNTS],
         "style": ["none", *STYLES]}
ALIGNMENT = ("shape", "colour", "count")   # the prompt attributes; "style" measures the adapter's look


class AttributeChecker(nn.Module):
    """conv(32)x2-pool-conv(64)x2-pool-conv(64)-pool-fc(128) -> one linear head per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(*block(3, w), *block(w, w), nn.MaxPool2d(2),
                                      *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
                                      *block(2 * w, 2 * w), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(2 * w * 16, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})
        self.width = width

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


def to_tensor(images) -> torch.Tensor:
    """PIL images or HxWx3 uint8 arrays (any size) -> N x 3 x 32 x 32 in [-1, 1]."""
    arrays = []
    for im in images:
        if not isinstance(im, Image.Image):
            im = Image.fromarray(np.asarray(im, dtype=np.uint8))
        im = im.convert("RGB")
        if im.size != (DEFAULT_RESOLUTION, DEFAULT_RESOLUTION):
            im = im.resize((DEFAULT_RESOLUTION, DEFAULT_RESOLUTION), Image.BILINEAR)
        arrays.append(np.asarray(im, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def labels(scenes: list[Scene], styles: list[str | None]) -> dict[str, torch.Tensor]:
    return {"shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
            "colour": torch.tensor([list(COLOURS).index(s.colour) for s in scenes]),
            "count": torch.tensor([COUNTS.index(s.count) for s in scenes]),
            "style": torch.tensor([HEADS["style"].index(st or "none") for st in styles])}


def make_split(n: int, seed: int, styled: bool = True, **fixed) -> tuple[torch.Tensor, list[Scene], list]:
    """``n`` rendered scenes of world ``seed``; with ``styled`` 60% of them in a random target style.
    Returns (images, scenes, style of each image or None)."""
    rng = np.random.default_rng(seed + 1000)
    scenes = [scene_at(seed, i, **fixed) for i in range(n)]
    images, styles = [], []
    for s in scenes:
        style = None
        if styled and rng.random() < 0.6:
            style = STYLES[rng.integers(len(STYLES))]
        images.append(apply_style(render(s), style))
        styles.append(style)
    return to_tensor(images), scenes, styles


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur (3x3 binomial kernel mixed in), gaussian noise and brightness/contrast jitter."""
    n = x.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
    a = torch.rand(n, 1, 1, 1, generator=g) * 0.8
    x = (1 - a) * x + a * blurred
    x = x * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    return x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.08


def train_checker(n_train: int = 20000, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3,
                  seed: int = 0, styled: bool = True, log=print, **fixed) -> AttributeChecker:
    torch.manual_seed(seed)
    x, scenes, styles = make_split(n_train, TRAIN_SEED, styled=styled, **fixed)
    y = labels(scenes, styles)
    model = AttributeChecker()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, n_train, (batch_size,), generator=g)
        out = model(_augment(x[idx], g))
        loss = sum(F.cross_entropy(out[k], y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"checker step {step}/{steps} loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def predict(model: AttributeChecker, images, batch_size: int = 256) -> dict[str, list[str]]:
    """Predicted attribute names for each image."""
    model.eval()
    x = images if isinstance(images, torch.Tensor) else to_tensor(images)
    preds: dict[str, list[str]] = {k: [] for k in HEADS}
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        for k, names in HEADS.items():
            preds[k].extend(names[j] for j in out[k].argmax(-1).tolist())
    return preds


def correct(model: AttributeChecker, images, scenes: list[Scene], style: str | None | list = None
            ) -> dict[str, list[bool]]:
    """Per image: is each attribute read as prompted; ``all`` = shape, colour and count all right;
    ``style``: is the image read as ``style`` (one name for all images, or one per image)."""
    preds = predict(model, images)
    styles = style if isinstance(style, list) else [style] * len(scenes)
    truth = {"shape": [s.shape for s in scenes], "colour": [s.colour for s in scenes],
             "count": [str(s.count) for s in scenes], "style": [st or "none" for st in styles]}
    res = {k: [p == t for p, t in zip(preds[k], truth[k])] for k in HEADS}
    res["all"] = [all(v) for v in zip(*(res[k] for k in ALIGNMENT))]
    return res


def accuracy(model: AttributeChecker, images, scenes: list[Scene], style=None) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in correct(model, images, scenes, style).items()}


CHANCE = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS), "count": 1 / len(COUNTS),
          "style": 1 / (len(STYLES) + 1),
          "all": 1 / (len(SHAPES) * len(COLOURS) * len(COUNTS))}


def save_checker(model: AttributeChecker, out_dir: str | Path, metrics: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "checker.safetensors"))
    cfg = {"width": model.width, "heads": HEADS, "resolution": DEFAULT_RESOLUTION, "metrics": metrics or {}}
    (out / "checker_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def load_checker(path: str | Path) -> AttributeChecker:
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "checker_config.json").read_text())
    model = AttributeChecker(width=cfg["width"])
    model.load_state_dict(load_file(str(path / "checker.safetensors")))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the toy-world attribute checker.")
    p.add_argument("--out", default="models/toy-checker")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model = train_checker(a.n_train, a.steps, seed=a.seed)
    metrics = {}
    for name, styled in (("plain", False), ("styled", True)):
        x, scenes, styles = make_split(a.n_test, TEST_SEED, styled=styled)
        metrics[name] = accuracy(model, x, scenes, styles)
        print(f"held-out accuracy ({name}, {a.n_test} scenes of world {TEST_SEED}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in metrics[name].items()))
    metrics["train_s"] = round(time.time() - t0, 1)
    metrics["command"] = "python -m styleinject.eval.toyworld.checker " + " ".join(sys.argv[1:] if argv is None else argv)
    save_checker(model, a.out, metrics)
    print(f"saved {a.out} ({metrics['train_s']} s)")


if __name__ == "__main__":
    main()
