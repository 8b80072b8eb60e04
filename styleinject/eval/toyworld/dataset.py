"""Write toy-world datasets in the training engine's folder format (png + same-name .txt).

The scene attributes are written to a hidden ``.scenes.jsonl`` next to the images (hidden files
are ignored by ``styleinject.train.data``), so a dataset can be scored against its own labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .render import DEFAULT_RESOLUTION, caption, render, scene_at
from .styles import STYLES, apply_style

SCENES_FILE = ".scenes.jsonl"


def write_dataset(out_dir: str | Path, n: int, *, seed: int = 0, resolution: int = DEFAULT_RESOLUTION,
                  style: str | None = None, start: int = 0) -> Path:
    """Render scenes ``start .. start+n-1`` of world ``seed`` (optionally styled) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        scene = scene_at(seed, i)
        name = f"{i:06d}"
        apply_style(render(scene, resolution), style).save(out / f"{name}.png")
        (out / f"{name}.txt").write_text(caption(scene) + "\n")
        lines.append(json.dumps({"file_name": f"{name}.png", **scene.to_dict()}) + "\n")
    (out / SCENES_FILE).write_text("".join(lines))  # written last: its presence marks a complete dataset
    return out


def read_scenes(dataset_dir: str | Path) -> list[dict]:
    with open(Path(dataset_dir) / SCENES_FILE) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a toy-world dataset (png + .txt captions).")
    p.add_argument("--out", required=True)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    p.add_argument("--style", choices=("none",) + STYLES, default="none")
    a = p.parse_args(argv)
    write_dataset(a.out, a.n, seed=a.seed, resolution=a.resolution, style=a.style, start=a.start)
    print(f"wrote {a.n} images to {a.out}")


if __name__ == "__main__":
    main()
