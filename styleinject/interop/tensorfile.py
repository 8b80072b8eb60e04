"""safetensors files as raw bytes: read and write tensors without torch and without converting them.

LoRA conversion only renames keys and reshapes (adds or drops axes of length 1), which never changes
a tensor's bytes. Working on the bytes keeps the API image torch-free, handles every dtype the format
has (numpy has no bfloat16, so ``safetensors.numpy`` cannot read many LoRA files) and makes a round
trip bit-identical by construction. ``safetensors.safe_open`` validates each file first (header,
offsets, sizes); only then are the offsets read from the header here.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class TensorFileError(ValueError):
    """Not a readable safetensors file."""


@dataclass
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def reshaped(self, shape: tuple[int, ...]) -> RawTensor:
        if math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return RawTensor(self.dtype, tuple(shape), self.data)

    def scalar(self) -> float:
        """The value of a one-element float tensor (a LoRA ``alpha``) as a Python float."""
        if math.prod(self.shape) != 1 or self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"expected one float value, got dtype {self.dtype} shape {list(self.shape)}")
        if self.dtype == "BF16":  # bfloat16 is the top half of a float32
            return float(np.frombuffer(b"\x00\x00" + self.data, dtype="<f4")[0])
        return float(np.frombuffer(self.data, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[self.dtype])[0])

    def is_finite(self) -> bool:
        if self.dtype not in FLOAT_DTYPES:
            return True
        if self.dtype == "BF16":
            bits = np.frombuffer(self.data, dtype="<u2")
            return not bool(((bits & 0x7F80) == 0x7F80).any())  # exponent all ones: Inf or NaN
        values = np.frombuffer(self.data, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[self.dtype])
        return bool(np.isfinite(values).all())

    @classmethod
    def from_float(cls, value: float) -> RawTensor:
        """A 0-d float tensor; float32 when it holds ``value`` exactly (the usual alpha dtype), else
        float64, so that an alpha survives a round trip through a file unchanged."""
        as32 = np.float32(value)
        if float(as32) == float(value):
            return cls("F32", (), as32.astype("<f4").tobytes())
        return cls("F64", (), np.float64(value).astype("<f8").tobytes())


def read_tensors(path: str | Path) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """All tensors of a safetensors file (raw bytes) and its string metadata."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:  # validates the whole layout
            metadata = dict(handle.metadata() or {})
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise TensorFileError(f"{path} is not a valid safetensors file ({exc}); LoRA files are read "
                              "only in the safetensors format (never pickled .ckpt/.pt/.bin)") from None
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        start = 8 + length
        tensors = {}
        for key in keys:
            info = header[key]
            begin, end = info["data_offsets"]
            handle.seek(start + begin)
            tensors[key] = RawTensor(info["dtype"], tuple(info["shape"]), handle.read(end - begin))
    return tensors, metadata


def write_tensors(path: str | Path, tensors: dict[str, RawTensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (tensors in key order, header padded to 8 bytes as the format asks)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key in sorted(tensors):
        tensor = tensors[key]
        if len(tensor.data) != math.prod(tensor.shape) * ITEMSIZE[tensor.dtype]:
            raise ValueError(f"{key}: {len(tensor.data)} bytes do not fit {tensor.dtype} {list(tensor.shape)}")
        header[key] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + len(tensor.data)]}
        offset += len(tensor.data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for key in sorted(tensors):
            handle.write(tensors[key].data)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata() or {})
