"""Models shipped inside the package.

``TOY_BASE`` is the toy-world base model (a 1 M-parameter text-to-image pipeline in the standard
diffusers format, 5 MB, trained on procedurally rendered shapes; see docs/toyworld.md). It draws
the shape, colour and count a prompt asks for ("two red circles on a white background") at
32 x 32, and is the embedded service's demo model when no ``STYLEINJECT_BASE_MODEL`` is set.
"""

from pathlib import Path

TOY_BASE = Path(__file__).resolve().parent / "toy-base"
