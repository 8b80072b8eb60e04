"""Minimal line plots with PIL (no plotting dependency): training-loss curves for docs/results.md.

    python -m styleinject.eval.toyworld.plot --log models/toy-base.log --out docs/img/toyworld/base-loss.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def line_plot(series: dict[str, tuple[list[float], list[float]]], path: str | Path, title: str = "",
              size: tuple[int, int] = (640, 360), ylabel: str = "loss") -> Path:
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    xs = [x for v in series.values() for x in v[0]]
    ys = [y for v in series.values() for y in v[1]]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def pt(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    d.rectangle((left, top, w - right, h - bottom), outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        d.text((4, pt(x0, yv)[1] - 6), f"{yv:.3g}", fill="black")
        xv = x0 + (x1 - x0) * i / 4
        d.text((pt(xv, y0)[0] - 10, h - bottom + 6), f"{xv:.0f}", fill="black")
    d.text((left, 8), f"{title}   (y: {ylabel}, x: step)", fill="black")
    for k, (name, (sx, sy)) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        d.line([pt(x, y) for x, y in zip(sx, sy)], fill=colour, width=2)
        d.text((w - right - 200, top + 6 + 14 * k), name, fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def curve_plot(results: dict, path: str | Path) -> list[Path]:
    """Alignment (attribute accuracy, all three right) and style accuracy over training, mean over
    seeds, from an experiments.py ``long`` result; step 0 is the base model without adapter."""
    base = results["base_model_no_adapter"]
    written = []
    for metric, label, suffix in (("all", "attribute acc (all)", ""), ("style", "style acc", "-style")):
        series = {name: ([0.0] + [c["step"] for c in t["curve"]],
                         [base[metric]["mean"]] + [c[metric]["mean"] for c in t["curve"]])
                  for name, t in results["table"].items() if t.get("curve")}
        out = Path(path)
        written.append(line_plot(series, out.with_name(out.stem + suffix + out.suffix),
                                 f"{results['style']}, lr {results['lr']}: {label}, mean of seeds {results['seeds']}",
                                 ylabel=label))
    return written


def read_log(path: str | Path, smooth: int = 5) -> tuple[list[float], list[float]]:
    """(steps, loss) from a base.py log ("step N/M loss L"), moving average over ``smooth`` points."""
    steps, losses = [], []
    for line in Path(path).read_text().splitlines():
        m = re.search(r"\] step (\d+)/\d+ loss ([0-9.]+)", line)
        if m:
            steps.append(float(m.group(1)))
            losses.append(float(m.group(2)))
    avg = [sum(losses[max(0, i - smooth + 1):i + 1]) / len(losses[max(0, i - smooth + 1):i + 1])
           for i in range(len(losses))]
    return steps, avg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Plot base.py training losses.")
    p.add_argument("--log", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="toy base: UNet epsilon-prediction loss (moving average of 5 logs)")
    a = p.parse_args(argv)
    line_plot({Path(f).stem: read_log(f) for f in a.log}, a.out, a.title)


if __name__ == "__main__":
    main()
