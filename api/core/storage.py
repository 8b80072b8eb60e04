"""The artifact store: where datasets, training outputs (adapter + checkpoints), uploads and
generated images live. Routes and tasks go through it instead of joining paths themselves.

An artifact is addressed by ``(kind, id)``: kind is one of KINDS, id a row id (dataset, job,
generation request, upload). Each artifact is a folder of files. Training and the library work on
local folders, so the interface is "local working copy + publish":

    path_for(kind, id)      the local folder to write into (created on demand by the caller)
    put_dir(kind, id, src)  publish a local folder as the artifact (no-op when src is path_for)
    get_dir(kind, id)       a local folder holding the artifact (a download cache for remote stores)
    write_bytes / open_read / exists / size / files / delete   single files and housekeeping
    locate(path)            the (kind, id) a stored path belongs to (rows keep local paths)

``LocalArtifactStore(root)`` is the default (a shared volume in compose). An object-store
implementation (S3) keeps the same methods: path_for is a local cache, put_dir uploads, get_dir
downloads on a miss. ``make_store(settings)`` picks the implementation.
"""

from __future__ import annotations

import abc
import shutil
from pathlib import Path
from typing import BinaryIO

from api.core.settings import Settings

UPLOADS, DATASETS, JOBS, GENERATIONS = "uploads", "datasets", "jobs", "generations"
KINDS = (UPLOADS, DATASETS, JOBS, GENERATIONS)


class ArtifactStore(abc.ABC):
    @abc.abstractmethod
    def path_for(self, kind: str, id_: str) -> Path:
        """The local folder of an artifact (not created)."""

    @abc.abstractmethod
    def put_dir(self, kind: str, id_: str, src: Path) -> None:
        """Publish the local folder ``src`` as the artifact (replacing what was there)."""

    @abc.abstractmethod
    def get_dir(self, kind: str, id_: str) -> Path:
        """A local folder holding the artifact; FileNotFoundError if there is none."""

    @abc.abstractmethod
    def write_bytes(self, kind: str, id_: str, name: str, data: bytes) -> None:
        """Write one file of an artifact."""

    @abc.abstractmethod
    def open_read(self, kind: str, id_: str, name: str) -> BinaryIO:
        """Open one file of an artifact for reading (binary)."""

    @abc.abstractmethod
    def exists(self, kind: str, id_: str, name: str | None = None) -> bool:
        """Whether the artifact (or one of its files) exists."""

    @abc.abstractmethod
    def files(self, kind: str, id_: str) -> list[str]:
        """The names of the artifact's top-level files, sorted ([] if it does not exist)."""

    @abc.abstractmethod
    def size(self, kind: str, id_: str) -> int:
        """Bytes of the artifact's top-level files (0 if it does not exist)."""

    @abc.abstractmethod
    def delete(self, kind: str, id_: str) -> None:
        """Remove the artifact; no error if it does not exist."""

    @abc.abstractmethod
    def locate(self, path: str | Path) -> tuple[str, str] | None:
        """The (kind, id) whose artifact ``path`` is or lies in; None if it is not in this store."""


def _check(kind: str, id_: str, name: str | None = None) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; one of {', '.join(KINDS)}")
    for part in (id_, name):
        if part is not None and (not part or "/" in part or "\\" in part or part in (".", "..")):
            raise ValueError(f"bad artifact id or file name {part!r}")


class LocalArtifactStore(ArtifactStore):
    """Artifacts as folders under ``root``: ``root/<kind>/<id>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def path_for(self, kind: str, id_: str) -> Path:
        _check(kind, id_)
        return self.root / kind / id_

    def put_dir(self, kind: str, id_: str, src: Path) -> None:
        dest = self.path_for(kind, id_)
        if Path(src).resolve() == dest:
            return
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dest)

    def get_dir(self, kind: str, id_: str) -> Path:
        path = self.path_for(kind, id_)
        if not path.is_dir():
            raise FileNotFoundError(f"{kind} artifact {id_} is missing from the artifact store")
        return path

    def write_bytes(self, kind: str, id_: str, name: str, data: bytes) -> None:
        _check(kind, id_, name)
        folder = self.path_for(kind, id_)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    def open_read(self, kind: str, id_: str, name: str) -> BinaryIO:
        _check(kind, id_, name)
        return open(self.path_for(kind, id_) / name, "rb")  # noqa: SIM115 - the caller closes it

    def exists(self, kind: str, id_: str, name: str | None = None) -> bool:
        _check(kind, id_, name)
        path = self.path_for(kind, id_)
        return (path / name).is_file() if name is not None else path.is_dir()

    def files(self, kind: str, id_: str) -> list[str]:
        path = self.path_for(kind, id_)
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []

    def size(self, kind: str, id_: str) -> int:
        path = self.path_for(kind, id_)
        return sum((path / name).stat().st_size for name in self.files(kind, id_))

    def delete(self, kind: str, id_: str) -> None:
        shutil.rmtree(self.path_for(kind, id_), ignore_errors=True)

    def locate(self, path: str | Path) -> tuple[str, str] | None:
        try:
            parts = Path(path).expanduser().resolve().relative_to(self.root).parts
        except ValueError:
            return None
        if len(parts) >= 2 and parts[0] in KINDS:
            return parts[0], parts[1]
        return None


def make_store(settings: Settings) -> ArtifactStore:
    """The store the settings describe (today: a local folder, STYLEINJECT_ARTIFACT_ROOT)."""
    return LocalArtifactStore(settings.artifact_root)
