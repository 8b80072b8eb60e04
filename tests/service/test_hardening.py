"""Hostile uploads and secrets, in-process: bombs are refused by POST /datasets within the stated
bound (nothing left behind), and keys never reach URLs, logs or error messages."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.core.settings import Settings
from api.core.storage import DATASETS, UPLOADS
from api.main import create_app
from styleinject.train import data
from tests.service.conftest import sqlite_settings

KEY = "boot-key-for-hardening"
AUTH = {"Authorization": f"Bearer {KEY}"}
MiB = 1 << 20


@pytest.fixture
def settings(tmp_path, monkeypatch):
    return sqlite_settings(monkeypatch, tmp_path / "home", bootstrap_key=KEY, max_upload_bytes=4 * MiB,
                           generate_timeout_s=0.2, base_model="/models/x")


def _zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for i in range(16):
            with archive.open(f"{i}.png", "w") as out:
                for _ in range(8):
                    out.write(bytes(MiB))
    return buffer.getvalue()


def _tar_bomb() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=9) as archive:
        for i in range(16):
            info = tarfile.TarInfo(f"{i}.png")
            info.size = 8 * MiB
            archive.addfile(info, io.BytesIO(bytes(info.size)))
    return buffer.getvalue()


@pytest.mark.parametrize("name, build", [("bomb.zip", _zip_bomb), ("bomb.tar.gz", _tar_bomb)])
def test_upload_bombs_are_422_within_the_bound(client, settings, monkeypatch, name, build):
    """128 MiB of zeros in ~130 KiB: refused, having written at most max(20 x upload, 1 MiB)."""
    body = build()
    peak: list[int] = []
    real = data.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        peak.append(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data.shutil, "rmtree", rmtree)
    response = client.post("/datasets", files={"file": (name, body)}, headers=AUTH)
    assert response.status_code == 422, response.text
    assert "decompression-bomb" in response.json()["message"]
    assert peak and max(peak) <= max(settings.max_extract_ratio * len(body), MiB)
    assert not any((settings.artifact_root / UPLOADS).iterdir())
    assert not (settings.artifact_root / DATASETS).exists() or not any((settings.artifact_root / DATASETS).iterdir())


def test_image_pixel_bound_is_a_setting(settings):
    """STYLEINJECT_MAX_IMAGE_PIXELS bounds uploaded images from their header (before decoding)."""
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(2):
            png = io.BytesIO()
            Image.new("RGB", (64, 64), (i * 100, 0, 0)).save(png, format="PNG")
            archive.writestr(f"{i}.png", png.getvalue())
            archive.writestr(f"{i}.txt", "a red square")
    upload = {"file": ("d.zip", buffer.getvalue())}
    for limit, expected in ((64 * 64, 201), (64 * 64 - 1, 422)):
        with TestClient(create_app(settings.model_copy(update={"max_image_pixels": limit}))) as client:
            response = client.post("/datasets", files=upload, headers=AUTH)
        assert response.status_code == expected, response.text
    assert "4096 pixels, more than the limit of 4095" in response.json()["message"]
    with pytest.raises(ValueError):
        Settings(max_image_pixels=10**9)  # PIL's own guard stays on above its bound: no higher value
