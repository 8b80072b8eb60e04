"""Bounded extraction: zip and tar bombs built here (small on disk, large unpacked) are refused with
the bytes written and the memory held never above the budget ``max(ratio x archive, 1 MiB)``.

Peak bytes written are measured at the moment of rejection (``safe_extract`` removes its folder
right after the error, and written bytes only grow until then); memory with ``tracemalloc``.
"""

from __future__ import annotations

import io
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from styleinject.train import data
from styleinject.train.data import EXTRACT_MIN_BUDGET, DatasetError, extract_budget, safe_extract

MiB = 1 << 20
RATIO = 20


@pytest.fixture
def peak_written(monkeypatch):
    """Bytes under the extraction folder when safe_extract gives up (just before it removes it)."""
    seen: list[int] = []
    real = data.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        seen.append(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data.shutil, "rmtree", rmtree)
    return seen


def _zip(path: Path, members: dict[str, int], zip64: bool = True) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, size in members.items():
            with archive.open(name, "w", force_zip64=zip64) as out:
                for _ in range(size // MiB):
                    out.write(bytes(MiB))
    return path


def _tgz(path: Path, members: dict[str, int]) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=9) as archive:
        for name, size in members.items():
            info = tarfile.TarInfo(name)
            info.size = size
            archive.addfile(info, io.BytesIO(bytes(size)))
    return path


def _extract_measured(archive: Path, dest: Path) -> tuple[str, int]:
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError) as caught:
            safe_extract(archive, dest, max_ratio=RATIO)
        _, peak_memory = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not dest.exists()
    return str(caught.value), peak_memory


@pytest.mark.parametrize("kind", ["zip-one", "zip-many", "zip-lying", "tgz-one", "tgz-many"])
def test_bombs_are_refused_within_the_budget(tmp_path, peak_written, kind):
    if kind == "zip-one":  # one member of 256 MiB of zeros
        archive = _zip(tmp_path / "bomb.zip", {"zeros.png": 256 * MiB})
    elif kind == "zip-many":  # 64 members of 4 MiB
        archive = _zip(tmp_path / "bomb.zip", {f"{i}.png": 4 * MiB for i in range(64)})
    elif kind == "zip-lying":  # 256 MiB behind a central directory that declares 1 MiB
        archive = _zip(tmp_path / "bomb.zip", {"zeros.png": 256 * MiB}, zip64=False)
        raw = bytearray(archive.read_bytes())
        central = raw.index(b"PK\x01\x02")
        raw[central + 24:central + 28] = MiB.to_bytes(4, "little")
        archive.write_bytes(bytes(raw))
    elif kind == "tgz-one":
        archive = _tgz(tmp_path / "bomb.tgz", {"zeros.png": 256 * MiB})
    else:
        archive = _tgz(tmp_path / "bomb.tgz", {f"{i}.png": 4 * MiB for i in range(64)})
    size = archive.stat().st_size
    budget = extract_budget(size, max_ratio=RATIO)
    assert size < 1 * MiB and budget == max(RATIO * size, EXTRACT_MIN_BUDGET)
    message, peak_memory = _extract_measured(archive, tmp_path / "dest")
    # a lying zip stops at its declared size (then fails its CRC): never more than declared is written
    assert "decompression-bomb" in message or ("corrupt" in message and kind == "zip-lying"), message
    assert len(peak_written) == 1
    written = peak_written[0]
    print(f"{kind}: archive {size} B, budget {budget} B, peak written {written} B, peak memory {peak_memory} B")
    assert written <= budget
    assert peak_memory < 8 * MiB  # a 1 MiB copy chunk or two, decompressor buffers: not the bomb


def test_an_ordinary_archive_within_the_ratio_extracts(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(tmp_path / "ok.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for i in range(3):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
            archive.writestr(f"img{i}.png", buffer.getvalue())
            archive.writestr(f"img{i}.txt", "a caption " * 50)
    dest = safe_extract(tmp_path / "ok.zip", tmp_path / "dest", max_ratio=RATIO)
    assert len(list(dest.iterdir())) == 6


def test_images_are_bounded_in_pixels_before_decoding(monkeypatch):
    """Refused from the header, before any pixel is decoded: a 20000 x 20000 PNG (a few hundred
    bytes; PIL's own guard at open) and anything over ``max_pixels`` (our check, before load())."""
    from PIL import Image, ImageFile

    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")  # 1 bit per pixel: small file
    loads: list[int] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))
    with pytest.raises(DatasetError, match="too large to decode safely"):  # PIL's guard, at open
        data.decode_image(buffer.getvalue(), "huge.png")
    with pytest.raises(DatasetError, match="more than the limit of 100"):
        data.decode_image(_png(20, 20), "small.png", max_pixels=100)
    assert loads == []
    data.decode_image(_png(10, 10), "ok.png", max_pixels=100)
    assert loads == [1]


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()
