"""Deterministic procedural renderer of the toy world: 1-3 flat shapes on a plain background.

A scene has one shape kind and one colour repeated ``count`` times (so "two red circles" names every
object in the picture), a size, a background and, for single-object scenes, a named position on a
3 x 3 grid. Everything is drawn with PIL at 4x the target resolution and downsampled (antialiased),
from a seeded numpy generator: the same (seed, index) always gives the same pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 25),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
SIZES = {"small": 0.10, "large": 0.16}          # radius as a fraction of the image side
COUNTS = (1, 2, 3)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
# 3 x 3 grid cells (column, row) -> name used in captions of single-object scenes
POSITIONS = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "center", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}
DEFAULT_RESOLUTION = 32
SUPERSAMPLE = 4

# caption templates; {obj} is "a small red circle" or "two small red circles"
TEMPLATES_ONE = (
    "{obj} at the {pos} on a {bg} background",
    "{obj} on a {bg} background, at the {pos}",
    "a picture of {obj} at the {pos}, {bg} background",
)
TEMPLATES_MANY = (
    "{obj} on a {bg} background",
    "a picture of {obj}, {bg} background",
    "{obj} drawn on a {bg} background",
)


@dataclass(frozen=True)
class Scene:
    """Attributes of one picture; ``centres`` are in [0, 1] image coordinates."""

    shape: str
    colour: str
    count: int
    size: str
    background: str
    position: str | None          # grid cell name when count == 1, else None
    centres: tuple[tuple[float, float], ...]
    template: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["centres"] = [list(c) for c in self.centres]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        d = dict(d)
        d["centres"] = tuple(tuple(c) for c in d["centres"])
        return cls(**d)


def object_phrase(shape: str, colour: str, count: int, size: str) -> str:
    if count == 1:
        return f"a {size} {colour} {shape}"
    return f"{NUMBER_WORDS[count]} {size} {colour} {shape}s"


def caption(scene: Scene) -> str:
    obj = object_phrase(scene.shape, scene.colour, scene.count, scene.size)
    if scene.count == 1:
        template = TEMPLATES_ONE[scene.template % len(TEMPLATES_ONE)]
        return template.format(obj=obj, pos=scene.position, bg=scene.background)
    template = TEMPLATES_MANY[scene.template % len(TEMPLATES_MANY)]
    return template.format(obj=obj, bg=scene.background)


def sample_scene(rng: np.random.Generator, **fixed) -> Scene:
    """Draw a random scene; keyword arguments (shape=, colour=, count=, ...) pin attributes."""
    shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    colour = fixed.get("colour") or list(COLOURS)[rng.integers(len(COLOURS))]
    count = int(fixed.get("count") or COUNTS[rng.integers(len(COUNTS))])
    size = fixed.get("size") or list(SIZES)[rng.integers(len(SIZES))]
    background = fixed.get("background") or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    cells = list(POSITIONS)
    if count == 1 and fixed.get("position"):
        chosen = [next(c for c, name in POSITIONS.items() if name == fixed["position"])]
    else:
        chosen = [cells[i] for i in rng.choice(len(cells), size=count, replace=False)]
    jitter = 0.06 if size == "small" else 0.03
    centres = tuple(
        (float((cx + 0.5) / 3 + rng.uniform(-jitter, jitter)), float((cy + 0.5) / 3 + rng.uniform(-jitter, jitter)))
        for cx, cy in chosen)
    position = POSITIONS[chosen[0]] if count == 1 else None
    template = int(fixed.get("template", rng.integers(len(TEMPLATES_ONE))))
    return Scene(shape, colour, count, size, background, position, centres, template)


def scene_at(seed: int, index: int, **fixed) -> Scene:
    """The ``index``-th scene of the world with ``seed`` (independent of any other index)."""
    return sample_scene(np.random.default_rng([seed, index]), **fixed)


def render(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``resolution`` x ``resolution`` pixels."""
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    r = SIZES[scene.size] * big
    fill = COLOURS[scene.colour]
    for cx, cy in scene.centres:
        x, y = cx * big, cy * big
        if scene.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif scene.shape == "square":
            s = r * 0.88  # same area order as the circle
            draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
        else:  # upward equilateral triangle inscribed in a circle of radius 1.15 r
            R = r * 1.15
            pts = [(x, y - R), (x - R * 0.866, y + R * 0.5), (x + R * 0.866, y + R * 0.5)]
            draw.polygon(pts, fill=fill)
    return image.resize((resolution, resolution), Image.LANCZOS)


def render_array(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    return np.asarray(render(scene, resolution), dtype=np.uint8)
