"""Builders for tiny datasets and malformed archives used by the training tests."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    # smooth-ish colour blobs (a pure-noise image is a poor overfitting target)
    base = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, n: int = 2, captions: bool = True, size: int = 64) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"img{i}.png").write_bytes(png_bytes(i, size))
        if captions:
            (root / f"img{i}.txt").write_text(f"a red photo number {i}")
    return root


def metadata_folder(root: Path, n: int = 2, teacher: bool = False) -> Path:
    image_folder(root, n, captions=False)
    lines = []
    for i in range(n):
        rec = {"file_name": f"img{i}.png", "text": f"ein Foto {i}"}
        if teacher:
            rec["teacher_text"] = f"a photo {i}"
        lines.append(json.dumps(rec))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def zip_folder(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
    return dest


def tar_folder(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return dest


def zip_with(dest: Path, members: dict[str, bytes], attrs: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if attrs and name in attrs:
                info.create_system = 3
                info.external_attr = attrs[name] << 16
            zf.writestr(info, data)
    return dest


def tar_with(dest: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    data = data or {}
    with tarfile.open(dest, "w:gz") as tf:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
    return dest


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


def snapshot(root: Path, exclude: Path | None = None) -> set[str]:
    """Every path under root (except under ``exclude``), for "wrote nothing else" checks."""
    out = set()
    for p in root.rglob("*"):
        if exclude is not None and (p == exclude or exclude in p.parents):
            continue
        out.add(p.relative_to(root).as_posix())
    return out
