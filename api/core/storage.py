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

    localise(path)          a stored path as a local path on this machine (fetched if remote)

``LocalArtifactStore(root)`` is the default (a shared volume in compose). ``S3ArtifactStore`` keeps
artifacts in object storage (AWS S3, MinIO, R2: ``STYLEINJECT_ARTIFACT_ROOT=s3://bucket/prefix``):
path_for is a folder of a local cache, put_dir uploads it, get_dir brings the cached copy up to date
(one LIST; only changed files are downloaded) and the cache is bounded in bytes. Rows keep the
local path the writer used; ``locate`` recognises a cache path of any machine (``.../s3-cache/
<bucket>/<prefix>/<kind>/<id>``), so a path written on a worker resolves on the API and vice versa.
``make_store(settings)`` picks the implementation.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from api.core.settings import Settings

log = logging.getLogger(__name__)

UPLOADS, DATASETS, JOBS, GENERATIONS = "uploads", "datasets", "jobs", "generations"
# adapters promoted from a checkpoint or imported from a LoRA file (a train job's own adapter stays in its job folder)
ADAPTERS = "adapters"
KINDS = (UPLOADS, DATASETS, JOBS, GENERATIONS, ADAPTERS)


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

    @abc.abstractmethod
    def ids(self, kind: str) -> list[str]:
        """The ids of ``kind`` held, sorted: stored, or (an object store) only in this machine's cache."""

    @abc.abstractmethod
    def modified(self, kind: str, id_: str) -> float | None:
        """When the artifact last changed (its newest file or object, epoch seconds); None: absent."""

    def localise(self, path: str | Path) -> str:
        """``path`` (a stored path, possibly written on another machine) as a local path here,
        fetching its artifact if the store is remote; paths outside the store come back unchanged.
        FileNotFoundError when the artifact is gone."""
        ref = self.locate(path)
        if ref is not None:
            self.get_dir(*ref)
        return str(path)


def _folders(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} if root.is_dir() else set()


def _newest_mtime(folder: Path) -> float | None:
    try:
        newest = folder.stat().st_mtime
    except OSError:
        return None
    for path in folder.rglob("*"):
        try:
            newest = max(newest, path.lstat().st_mtime)
        except OSError:  # removed meanwhile
            pass
    return newest


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

    def ids(self, kind: str) -> list[str]:
        _check(kind, "x")
        return sorted(_folders(self.root / kind))

    def modified(self, kind: str, id_: str) -> float | None:
        return _newest_mtime(self.path_for(kind, id_))

    def locate(self, path: str | Path) -> tuple[str, str] | None:
        try:
            parts = Path(path).expanduser().resolve().relative_to(self.root).parts
        except ValueError:
            return None
        if len(parts) >= 2 and parts[0] in KINDS:
            return parts[0], parts[1]
        return None


class S3ArtifactStore(ArtifactStore):
    """Artifacts as objects ``<prefix>/<kind>/<id>/<relative path>`` in an S3 bucket, with a local
    cache ``<cache_dir>/s3-cache/<bucket>/<prefix>/<kind>/<id>/`` of at most ``cache_bytes``.

    Only fetched copies count as cache: what this machine wrote itself (a job's output while it
    trains, an extracted upload) stays until ``delete``. The bound is soft: copies used in the last
    ``min_age_s`` seconds (an adapter being read) are never evicted. Processes of one machine may share the cache folder (an
    flock per artifact); every cached artifact carries a manifest of the objects it mirrors, so an
    unchanged file is never transferred twice.
    """

    MANIFEST = ".s3-manifest.json"

    def __init__(self, url: str, cache_dir: str | Path, cache_bytes: int = 20 * 1024**3, *,
                 endpoint_url: str | None = None, region: str | None = None, client: Any = None,
                 min_age_s: float = 60.0) -> None:
        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise ValueError(f"an object store URL looks like s3://bucket/prefix, not {url!r}")
        self.bucket, _, prefix = url[5:].partition("/")
        self.prefix = "/".join(p for p in prefix.split("/") if p)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._marker = ("s3-cache", self.bucket, *(self.prefix.split("/") if self.prefix else ()))
        self.root = Path(cache_dir).expanduser().resolve().joinpath(*self._marker)
        self.cache_bytes = cache_bytes
        self.min_age_s = min_age_s
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(s3={"addressing_style": "path"} if endpoint_url else {},
                            retries={"max_attempts": 5, "mode": "standard"})
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self.client = client

    # -- keys and local paths --------------------------------------------------------------------

    def _key(self, kind: str, id_: str, rel: str = "") -> str:
        _check(kind, id_)
        return "/".join(p for p in (self.prefix, kind, id_, rel) if p)

    def _objects(self, kind: str, id_: str, top_level: bool = False) -> dict[str, dict[str, Any]]:
        """{relative path: {"size", "etag"}} of the artifact's objects."""
        base = self._key(kind, id_) + "/"
        options: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base}
        if top_level:
            options["Delimiter"] = "/"
        found: dict[str, dict[str, Any]] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(**options):
            for item in page.get("Contents", ()):
                found[item["Key"][len(base):]] = {"size": item["Size"], "etag": item["ETag"].strip('"')}
        return found

    def path_for(self, kind: str, id_: str) -> Path:
        _check(kind, id_)
        return self.root / kind / id_

    def _split(self, path: str | Path) -> tuple[str, str, tuple[str, ...]] | None:
        text = str(path)
        if text.startswith("s3://"):
            if not (text + "/").startswith(self.url + "/"):
                return None
            parts: tuple[str, ...] = tuple(p for p in text[len(self.url):].split("/") if p)
        else:
            all_parts = Path(text).expanduser().parts
            n = len(self._marker)
            starts = [i for i in range(len(all_parts) - n + 1) if all_parts[i:i + n] == self._marker]
            if not starts:
                return None
            parts = all_parts[starts[-1] + n:]
        if len(parts) >= 2 and parts[0] in KINDS and parts[1] not in (".", ".."):
            return parts[0], parts[1], parts[2:]
        return None

    def locate(self, path: str | Path) -> tuple[str, str] | None:
        found = self._split(path)
        return None if found is None else found[:2]

    def localise(self, path: str | Path) -> str:
        found = self._split(path)
        if found is None:
            return str(path)
        kind, id_, rest = found
        return str(self.get_dir(kind, id_).joinpath(*rest))

    # -- the cache ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, kind: str, id_: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{kind}-{id_}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _manifest(self, folder: Path) -> dict[str, dict[str, Any]]:
        try:
            return json.loads((folder / self.MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _save_manifest(self, folder: Path, files: dict[str, dict[str, Any]], fetched: bool) -> None:
        """fetched: the folder is a downloaded copy (evictable); else this machine wrote it (a job's
        output while it trains, an upload): kept until ``delete``."""
        tmp = folder / f"{self.MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"files": files, "fetched": fetched}, sort_keys=True))
        os.replace(tmp, folder / self.MANIFEST)  # also marks the folder as used now (mtime)

    def _evictable(self, manifest: Path) -> bool:
        try:
            return bool(json.loads(manifest.read_text()).get("fetched"))
        except (OSError, ValueError, AttributeError):
            return False

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def _local_files(self, folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            return {}
        return {PurePosixPath(p.relative_to(folder).as_posix()).as_posix(): p
                for p in folder.rglob("*") if p.is_file() and not p.name.startswith(self.MANIFEST)}

    def _evict(self, keep: Path) -> None:
        """Drop least recently used cached artifacts until the cache fits ``cache_bytes``."""
        entries = []
        for kind in KINDS:
            base = self.root / kind
            if not base.is_dir():
                continue
            for folder in base.iterdir():
                manifest = folder / self.MANIFEST
                if folder.is_dir() and manifest.is_file() and self._evictable(manifest):
                    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                    entries.append((manifest.stat().st_mtime, size, kind, folder))
        total = sum(e[1] for e in entries)
        now = time.time()
        for used, size, kind, folder in sorted(entries, key=lambda e: e[0]):
            if total <= self.cache_bytes:
                break
            if folder == keep or now - used < self.min_age_s:
                continue
            with self._locked(kind, folder.name):
                shutil.rmtree(folder, ignore_errors=True)
            total -= size

    # -- the interface -------------------------------------------------------------------------------

    def put_dir(self, kind: str, id_: str, src: Path) -> None:
        src = Path(src)
        dest = self.path_for(kind, id_)
        with self._locked(kind, id_):
            remote = self._objects(kind, id_)
            own = src.resolve() == dest
            manifest = self._manifest(dest) if own else {}
            local = self._local_files(src)
            for rel, path in sorted(local.items()):
                stamp = self._stamp(path)
                known = manifest.get(rel)
                if known and known["stamp"] == stamp and remote.get(rel, {}).get("etag") == known["etag"]:
                    continue  # uploaded before and unchanged since
                self.client.upload_file(str(path), self.bucket, self._key(kind, id_, rel))
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(kind, id_, rel))
                manifest[rel] = {"stamp": stamp, "etag": head["ETag"].strip('"')}
            self._delete_keys([self._key(kind, id_, rel) for rel in remote if rel not in local])
            if own:
                self._save_manifest(dest, {rel: manifest[rel] for rel in local}, fetched=False)

    def get_dir(self, kind: str, id_: str) -> Path:
        folder = self.path_for(kind, id_)
        with self._locked(kind, id_):
            remote = self._objects(kind, id_)
            if not remote:
                raise FileNotFoundError(f"{kind} artifact {id_} is missing from the artifact store {self.url}")
            folder.mkdir(parents=True, exist_ok=True)
            manifest = self._manifest(folder)
            local = self._local_files(folder)
            for rel, info in remote.items():
                path = folder / rel
                known = manifest.get(rel)
                if rel in local and known and known["etag"] == info["etag"] and known["stamp"] == self._stamp(path):
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
                self.client.download_file(self.bucket, self._key(kind, id_, rel), str(tmp))
                os.replace(tmp, path)
                manifest[rel] = {"stamp": self._stamp(path), "etag": info["etag"]}
            for rel, path in local.items():
                if rel not in remote:
                    path.unlink(missing_ok=True)
            for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()  # folders left empty
            self._save_manifest(folder, {rel: manifest[rel] for rel in remote}, fetched=True)
        self._evict(keep=folder)
        return folder

    def write_bytes(self, kind: str, id_: str, name: str, data: bytes) -> None:
        _check(kind, id_, name)
        self.client.put_object(Bucket=self.bucket, Key=self._key(kind, id_, name), Body=data)

    def open_read(self, kind: str, id_: str, name: str) -> BinaryIO:
        _check(kind, id_, name)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(kind, id_, name))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"{kind} artifact {id_} has no file {name}") from None
        return body  # a botocore StreamingBody: read(), close(), a context manager

    def exists(self, kind: str, id_: str, name: str | None = None) -> bool:
        _check(kind, id_, name)
        if name is None:
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(kind, id_) + "/", MaxKeys=1)
            return page.get("KeyCount", 0) > 0
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(kind, id_, name))
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def files(self, kind: str, id_: str) -> list[str]:
        return sorted(self._objects(kind, id_, top_level=True))

    def size(self, kind: str, id_: str) -> int:
        return sum(info["size"] for info in self._objects(kind, id_, top_level=True).values())

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk],
                                                                   "Quiet": True})

    def delete(self, kind: str, id_: str) -> None:
        with self._locked(kind, id_):
            self._delete_keys([self._key(kind, id_, rel) for rel in self._objects(kind, id_)])
            shutil.rmtree(self.path_for(kind, id_), ignore_errors=True)

    def ids(self, kind: str) -> list[str]:
        """One delimited LIST of ``<prefix>/<kind>/`` (a name per artifact, not per object) plus the
        cache's folders: an artifact another machine wrote but never published is only there."""
        _check(kind, "x")
        base = "/".join(p for p in (self.prefix, kind) if p) + "/"
        found = _folders(self.root / kind)
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base,
                                                                          Delimiter="/"):
            found.update(item["Prefix"][len(base):].rstrip("/") for item in page.get("CommonPrefixes", ()))
        return sorted(found)

    def modified(self, kind: str, id_: str) -> float | None:
        times = [item["LastModified"].timestamp() for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(kind, id_) + "/") for item in page.get("Contents", ())]
        local = _newest_mtime(self.path_for(kind, id_))
        return max(times + ([local] if local is not None else []), default=None)


def make_store(settings: Settings) -> ArtifactStore:
    """The store the settings describe: STYLEINJECT_ARTIFACT_ROOT, a local folder or s3://bucket/prefix."""
    if settings.object_storage:
        return S3ArtifactStore(str(settings.artifact_root), settings.artifact_cache_dir, settings.artifact_cache_bytes,
                               endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    return LocalArtifactStore(settings.artifact_root)
