"""Models shipped inside the package.

``TOY_BASE`` is the toy-world base model (a 1 M-parameter text-to-image pipeline in the standard
diffusers format, 5 MB, trained on procedurally rendered shapes; see docs/toyworld.md). It draws
the shape, colour and count a prompt asks for ("two red circles on a white background") at
32 x 32, and is the embedded service's demo model when no ``STYLEINJECT_BASE_MODEL`` is set.

``TOY_CLIP`` (a CLIP trained on toy-world scenes and captions, 1.3 MB) and ``TOY_CHECKER`` (the
attribute checker: shape, colour, count and style of a toy-world image, 0.9 MB) are the toy
world's scorers: the embedded service scores checkpoints with them when no other scorer weights
are configured (``styleinject.eval.scorers``: clipscore with ``TOY_CLIP``, toystyle). The copies
under ``models/`` are where the toy-world scripts write them (docs/toyworld.md).
"""

from pathlib import Path

TOY_BASE = Path(__file__).resolve().parent / "toy-base"
TOY_CLIP = Path(__file__).resolve().parent / "toy-clip"
TOY_CHECKER = Path(__file__).resolve().parent / "toy-checker"
