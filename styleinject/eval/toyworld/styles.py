"""Target styles of the toy world: deterministic transforms of a rendered image.

Each style keeps the scene readable (shape, colour family, count, position) and changes its look,
so a style adapter can be scored for both style (distance to the styled reference) and alignment
(the attribute checker still reads the prompt's shape, colour and count).

- ``pastel``  palette shift: every colour is blended 45% toward a warm cream (255, 236, 210).
- ``stripes`` texture: diagonal dark stripes (period 4 px at 32 px) inside the objects only.
- ``outline`` outline look: a 1-pixel contour around each object, black on light backgrounds and
  white on the black background, with the object interior flattened to 60% of its colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

STYLES = ("pastel", "stripes", "outline")
PASTEL_TARGET = np.array([255, 236, 210], dtype=np.float32)


def _object_mask(a: np.ndarray) -> np.ndarray:
    """Pixels that differ from the background (read from the top-left corner pixel)."""
    bg = a[0, 0].astype(np.int16)
    return np.abs(a.astype(np.int16) - bg).sum(axis=-1) > 30


def pastel(image: Image.Image) -> Image.Image:
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = 0.55 * a + 0.45 * PASTEL_TARGET
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def stripes(image: Image.Image) -> Image.Image:
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = a.shape[:2]
    period = max(4, round(w / 8))
    yy, xx = np.mgrid[0:h, 0:w]
    band = ((xx + yy) % period) < period // 2
    mask = _object_mask(a) & band
    out = a.copy()
    out[mask] *= 0.45
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def outline(image: Image.Image) -> Image.Image:
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = _object_mask(a)
    m = Image.fromarray((mask * 255).astype(np.uint8))
    edge = (np.asarray(m.filter(ImageFilter.MaxFilter(3))) > 0) & ~(np.asarray(m.filter(ImageFilter.MinFilter(3))) > 0)
    dark_bg = a[0, 0].mean() < 60
    out = a.copy()
    out[mask] = 0.6 * a[mask] + 0.4 * a[0, 0]
    out[edge] = 255.0 if dark_bg else 0.0
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


_FUNCS = {"pastel": pastel, "stripes": stripes, "outline": outline}


def apply_style(image: Image.Image, style: str | None) -> Image.Image:
    """Apply a named style (None or "none" returns the image unchanged)."""
    if style in (None, "none"):
        return image
    try:
        return _FUNCS[style](image)
    except KeyError:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)} or 'none'") from None
