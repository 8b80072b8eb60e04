"""Training datasets: formats, validation, safe archive extraction and a resumable data order.

Accepted inputs (see docs/training.md):

* a folder, ``.zip`` or ``.tar``/``.tar.gz``/``.tgz`` of images with same-name ``.txt`` captions
  (``cat.png`` + ``cat.txt``; sub-folders allowed);
* the same with a ``metadata.jsonl`` at the root instead of captions: one JSON object per line with
  ``file_name`` (relative to the file), ``text`` and optionally ``teacher_text``;
* for distillation only, a prompts file: ``.txt`` (one prompt per line) or ``.jsonl``
  (``{"text": ..., "teacher_text": ...}`` per line).

Everything is validated before training starts: every image decodes (PIL's decompression-bomb
guard on), every image has a caption, nothing else sits in the folder. A bad item raises
:class:`DatasetError` naming the file and the fix, or is skipped and counted with ``skip_bad``.
Archives are extracted by :func:`safe_extract`, never by ``extractall``; nothing is unpickled.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from styleinject.errors import FieldError
from styleinject.names import ARCHIVE_SUFFIXES, PROMPTS_SUFFIXES, TRAIN_KINDS

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_EXTENSION = ".txt"
METADATA_NAME = "metadata.jsonl"
# Operating-system clutter that archives and folders often carry; never treated as data.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})

MAX_EXTRACT_BYTES = 16 * 1024**3  # total uncompressed size an archive may expand to
MAX_EXTRACT_FILES = 200_000  # members (files + folders) an archive may hold
# Ratio budget (optional; the service always sets one): an archive of N bytes may expand to at most
# max(max_ratio * N, EXTRACT_MIN_BUDGET) bytes, counted while reading, so a rejected archive never
# makes us write more than that (nor hold more than one copy chunk in memory).
EXTRACT_MIN_BUDGET = 1 << 20
MAX_IMAGE_PIXELS = 89_478_485  # PIL's default bomb limit (warning level); above it is an error
_COPY_CHUNK = 1 << 20

KINDS = TRAIN_KINDS  # the old name, kept for callers


class DatasetError(FieldError):
    """A dataset that cannot be used; the message names the file, the problem and the fix.
    Options appear as fields (``{skip_bad}``, ``{data}``): see :mod:`styleinject.errors`."""


@dataclass(frozen=True)
class Item:
    """One training example: an image (``None`` for prompts-only data) and its prompts."""

    name: str  # path relative to the dataset root (or "line N" for prompts files)
    image: Path | None
    text: str | None
    teacher_text: str | None = None


@dataclass
class DatasetInfo:
    format: str  # "folder" | "zip" | "tar" | "prompts"
    num_items: int
    has_teacher_text: bool
    sha256: str
    layout: str = "captions"  # "captions" | "metadata" | "images" | "prompts"
    num_skipped: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass
class LoadedDataset:
    info: DatasetInfo
    items: list[Item]
    root: Path | None  # folder the items live in (extracted archives: inside the workdir)


# --------------------------------------------------------------------------------------------
# Archive extraction
# --------------------------------------------------------------------------------------------


def is_archive(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(ARCHIVE_SUFFIXES)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _member_parts(archive: str, name: str) -> list[str] | None:
    """Checked path parts of an archive member; ``None`` for entries to skip (OS clutter)."""
    if "\x00" in name:
        raise DatasetError.text(f"{archive}: member {name!r} has a NUL byte in its name; rebuild the archive")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise DatasetError.text(
            f"{archive}: member {name!r} has an absolute path; rebuild the archive with paths "
            "relative to the dataset folder"
        )
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DatasetError.text(
            f"{archive}: member {name!r} points outside the extraction folder (path traversal); "
            "rebuild the archive with plain relative paths"
        )
    if not parts:
        return None
    if parts[0] in IGNORED_NAMES or parts[-1] in IGNORED_NAMES:
        return None
    return parts


def _target(dest: Path, archive: str, name: str, parts: list[str]) -> Path:
    target = dest.joinpath(*parts)
    if not target.resolve().is_relative_to(dest.resolve()):  # belt and braces after the parts check
        raise DatasetError.text(f"{archive}: member {name!r} points outside the extraction folder")
    return target


class _Limit(int):
    """The byte budget of one extraction, carrying the words that explain it."""

    why: str

    def __new__(cls, value: int, why: str) -> "_Limit":
        obj = super().__new__(cls, value)
        obj.why = why
        return obj


def _why(max_bytes: int) -> str:
    return getattr(max_bytes, "why", "decompression-bomb guard")


def _copy_counted(src, target: Path, archive: str, name: str, declared: int, budget: list[int],
                  max_bytes: int) -> None:
    """Copy a member stream, counting the bytes actually written against the declared size and
    the archive's total budget (a member may lie about its size)."""
    written = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # "xb": never overwrite, never follow a pre-existing link (there is none: we create no links)
        out = open(target, "xb")
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        raise DatasetError.text(f"{archive}: member {name!r} clashes with another member of the same "
                           "name; rebuild the archive") from None
    with out:
        while True:
            chunk = src.read(_COPY_CHUNK)
            if not chunk:
                break
            written += len(chunk)
            budget[0] += len(chunk)
            if written > declared:
                raise DatasetError.text(
                    f"{archive}: member {name!r} holds more data than its declared size "
                    f"({_fmt_bytes(declared)}); the archive is malformed, rebuild it"
                )
            if budget[0] > max_bytes:
                raise DatasetError.text(
                    f"{archive}: archive expands to more than {_fmt_bytes(max_bytes)} "
                    f"({_why(max_bytes)}); split the dataset or raise the limit"
                )
            out.write(chunk)


def _check_totals(archive: str, count: int, total: int, max_files: int, max_bytes: int) -> None:
    if count > max_files:
        raise DatasetError.text(
            f"{archive}: archive holds more than {max_files} entries; split the dataset or raise the limit"
        )
    if total > max_bytes:
        raise DatasetError.text(
            f"{archive}: archive expands to {_fmt_bytes(total)}, more than the limit of "
            f"{_fmt_bytes(max_bytes)} ({_why(max_bytes)}); split the dataset or raise the limit"
        )


def _extract_zip(path: Path, dest: Path, max_bytes: int, max_files: int) -> int:
    archive = path.name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError.text(f"{archive}: not a readable zip archive ({exc}); re-create the zip") from None
    with zf:
        infos = zf.infolist()
        # 1. check every member before writing anything
        plan: list[tuple[zipfile.ZipInfo, list[str]]] = []
        total = 0
        seen: set[str] = set()
        _check_totals(archive, len(infos), 0, max_files, max_bytes)
        for info in infos:
            parts = _member_parts(archive, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DatasetError.text(
                    f"{archive}: member {info.filename!r} is a symbolic link; archives may hold "
                    "only regular files and folders, replace the link by the file"
                )
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise DatasetError.text(
                    f"{archive}: member {info.filename!r} is a device file, FIFO or socket; "
                    "archives may hold only regular files and folders"
                )
            if info.flag_bits & 0x1:
                raise DatasetError.text(f"{archive}: member {info.filename!r} is encrypted; upload an unencrypted zip")
            if parts is None:
                continue
            key = "/".join(parts).lower()
            if not info.is_dir():
                if key in seen:
                    raise DatasetError.text(f"{archive}: member {info.filename!r} appears twice; rebuild the archive")
                seen.add(key)
                total += info.file_size
            _check_totals(archive, len(infos), total, max_files, max_bytes)
            plan.append((info, parts))
        # 2. extract, counting the bytes actually written
        budget = [0]
        files = 0
        for info, parts in plan:
            target = _target(dest, archive, info.filename, parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            try:
                with zf.open(info) as src:
                    _copy_counted(src, target, archive, info.filename, info.file_size, budget, max_bytes)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                raise DatasetError.text(
                    f"{archive}: member {info.filename!r} is corrupt ({exc}); re-create the zip"
                ) from None
            files += 1
    return files


def _extract_tar(path: Path, dest: Path, max_bytes: int, max_files: int) -> int:
    archive = path.name
    try:
        tf = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError.text(f"{archive}: not a readable tar archive ({exc}); re-create the archive") from None
    budget = [0]
    files = count = 0
    total = 0
    seen: set[str] = set()
    with tf:
        try:
            # streamed: members are checked as they come, the caller removes dest on failure
            for member in tf:
                count += 1
                parts = _member_parts(archive, member.name)
                if member.issym() or member.islnk():
                    kind = "symbolic" if member.issym() else "hard"
                    raise DatasetError.text(
                        f"{archive}: member {member.name!r} is a {kind} link; archives may hold only "
                        "regular files and folders, replace the link by the file"
                    )
                if member.ischr() or member.isblk() or member.isfifo():
                    raise DatasetError.text(
                        f"{archive}: member {member.name!r} is a device file or FIFO; archives may "
                        "hold only regular files and folders"
                    )
                if not (member.isreg() or member.isdir()):
                    raise DatasetError.text(
                        f"{archive}: member {member.name!r} has an unsupported type; archives may "
                        "hold only regular files and folders"
                    )
                if member.isreg():
                    total += member.size
                _check_totals(archive, count, total, max_files, max_bytes)
                # the decompressed tar stream read so far (headers, skipped members): bounded too
                _check_totals(archive, count, tf.offset, max_files, max_bytes)
                if parts is None:
                    continue
                target = _target(dest, archive, member.name, parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                key = "/".join(parts).lower()
                if key in seen:
                    raise DatasetError.text(f"{archive}: member {member.name!r} appears twice; rebuild the archive")
                seen.add(key)
                src = tf.extractfile(member)
                if src is None:  # pragma: no cover - isreg() members always have a stream
                    raise DatasetError.text(f"{archive}: member {member.name!r} cannot be read")
                with src:
                    _copy_counted(src, target, archive, member.name, member.size, budget, max_bytes)
                files += 1
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise DatasetError.text(f"{archive}: archive is truncated or corrupt ({exc}); re-create it") from None
    return files


def extract_budget(archive_size: int, max_bytes: int = MAX_EXTRACT_BYTES, max_ratio: float | None = None) -> int:
    """Most bytes an archive of ``archive_size`` bytes may expand to: ``max_bytes``, and with a
    ``max_ratio`` also ``max(max_ratio * archive_size, EXTRACT_MIN_BUDGET)``."""
    if max_ratio is None:
        return _Limit(max_bytes, "decompression-bomb guard")
    by_ratio = max(int(max_ratio * archive_size), EXTRACT_MIN_BUDGET)
    if by_ratio >= max_bytes:
        return _Limit(max_bytes, "decompression-bomb guard")
    return _Limit(by_ratio, f"decompression-bomb guard: at most {max_ratio:g} times the archive's "
                            f"{_fmt_bytes(archive_size)}, or {_fmt_bytes(EXTRACT_MIN_BUDGET)}")


def safe_extract(archive_path: str | os.PathLike, dest_dir: str | os.PathLike, *,
                 max_bytes: int = MAX_EXTRACT_BYTES, max_files: int = MAX_EXTRACT_FILES,
                 max_ratio: float | None = None) -> Path:
    """Extract a zip or tar(.gz) archive into ``dest_dir`` (created; must not hold files).

    Refuses path traversal, absolute paths, symbolic and hard links, device files, encrypted
    members and decompression bombs: more than ``max_files`` entries, or more bytes than
    :func:`extract_budget` allows (``max_bytes``; with ``max_ratio`` also ``max_ratio`` times the
    archive's size, at least ``EXTRACT_MIN_BUDGET``). The budget is checked on the declared sizes
    before a member is written and again on every chunk actually written (and, for tar, on the
    decompressed stream read, headers included), so a rejected archive never leaves more than the
    budget on disk at any moment, and memory holds one copy chunk (1 MiB). On any failure
    ``dest_dir`` is removed and :class:`DatasetError` is raised. Returns ``dest_dir``.
    """
    path = Path(archive_path)
    dest = Path(dest_dir)
    if not path.is_file():
        raise DatasetError.text(f"{path}: archive not found; check the path")
    max_bytes = extract_budget(path.stat().st_size, max_bytes, max_ratio)
    if dest.exists() and any(dest.iterdir()):
        raise DatasetError.text(f"{dest}: extraction folder is not empty; choose an empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if path.name.lower().endswith(".zip"):
            files = _extract_zip(path, dest, max_bytes, max_files)
        elif is_archive(path):
            files = _extract_tar(path, dest, max_bytes, max_files)
        else:
            raise DatasetError.text(f"{path.name}: not a .zip, .tar, .tar.gz or .tgz archive")
        if files == 0:
            raise DatasetError.text(f"{path.name}: archive is empty (no files); add the images and captions")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


# --------------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode an image, bounded in pixels before decoding: the header's width x height must
    be at most ``max_pixels`` (and PIL's own decompression-bomb guard stays on, its warning an error)."""
    if Image.MAX_IMAGE_PIXELS is None:  # a library switched the guard off: switch it back on
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            width, height = img.size
            if width * height > max_pixels:
                raise DatasetError.text(
                    f"{name}: image is {width} x {height} = {width * height} pixels, more than the limit "
                    f"of {max_pixels} (decompression-bomb guard); resize it")
            img.load()
    except DatasetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError.text(f"{name}: image is too large to decode safely ({exc}); resize it") from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise DatasetError.text(f"{name}: cannot decode image ({type(exc).__name__}: {exc}); "
                           "replace the file") from None
    return img


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise DatasetError.text(f"{name}: caption is not UTF-8 text; save it as UTF-8") from None


def _visible(root: Path):
    """Files under root, sorted, without hidden files and OS clutter."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in IGNORED_NAMES)
        for fn in sorted(filenames):
            if fn.startswith(".") or fn in IGNORED_NAMES:
                continue
            out.append(Path(dirpath) / fn)
    return out


def _dataset_root(root: Path) -> Path:
    """Descend into a single top-level folder (the usual layout of a zipped folder)."""
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.name not in IGNORED_NAMES]
        if len(entries) == 1 and entries[0].is_dir():
            root = entries[0]
        else:
            return root


class _Collector:
    """Items plus the per-item errors: raised at once, or skipped and counted."""

    def __init__(self, skip_bad: bool, max_pixels: int = MAX_IMAGE_PIXELS):
        self.skip_bad = skip_bad
        self.max_pixels = max_pixels
        self.items: list[Item] = []
        self.skipped: list[str] = []

    def bad(self, message: str) -> None:
        """``message``: the problem and the fix, in plain text (file names and all)."""
        if not self.skip_bad:
            raise DatasetError("{problem} or pass {skip_bad} to leave it out", problem=message)
        self.skipped.append(message)


def _check_image(path: Path, name: str, col: _Collector, hasher: dict[str, str]) -> bool:
    data = path.read_bytes()
    try:
        decode_image(data, name, col.max_pixels)
    except DatasetError as exc:
        col.bad(str(exc))
        return False
    hasher[name] = hashlib.sha256(data).hexdigest()
    return True


def _read_captions_folder(root: Path, kind: str, col: _Collector, hashes: dict[str, str]) -> str:
    files = _visible(root)
    image_stems = {f.with_suffix("") for f in files if f.suffix.lower() in IMAGE_EXTENSIONS}
    captions = {f.with_suffix(""): f for f in files if f.suffix.lower() == CAPTION_EXTENSION}
    need_caption = kind != "dreambooth"
    for f in files:
        rel = f.relative_to(root).as_posix()
        suffix = f.suffix.lower()
        if suffix == CAPTION_EXTENSION:
            if need_caption and f.with_suffix("") not in image_stems:
                col.bad(f"{rel}: caption without an image (expected {f.stem}.png/.jpg/... next to it); "
                        "add the image or remove the caption")
            continue
        if suffix not in IMAGE_EXTENSIONS:
            col.bad(f"{rel}: not an image or caption file (images: {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                    f"captions: same-name .txt); remove it")
            continue
        text = None
        cap = captions.get(f.with_suffix(""))
        if need_caption:
            if cap is None:
                expected = f.with_suffix(CAPTION_EXTENSION).relative_to(root).as_posix()
                col.bad(f"{rel}: no caption (expected {expected} next to it); add one")
                continue
            text = _read_text(cap, cap.relative_to(root).as_posix())
            if not text:
                col.bad(f"{cap.relative_to(root).as_posix()}: caption is empty; write a caption")
                continue
        elif cap is not None:
            text = _read_text(cap, cap.relative_to(root).as_posix()) or None
        if _check_image(f, rel, col, hashes):
            col.items.append(Item(name=rel, image=f, text=text))
    return "captions" if need_caption else "images"


def _json_lines(path: Path, name: str, col: _Collector):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatasetError.text(f"{name}: not UTF-8 text; save it as UTF-8") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            col.bad(f"{name} line {lineno}: invalid JSON ({exc.msg}); fix the line")
            continue
        if not isinstance(rec, dict):
            col.bad(f"{name} line {lineno}: expected a JSON object; fix the line")
            continue
        yield lineno, rec


def _text_field(rec: dict, key: str, where: str, col: _Collector, required: bool) -> tuple[bool, str | None]:
    value = rec.get(key)
    if value is None:
        if required:
            col.bad(f"{where}: missing \"{key}\"; add the caption")
            return False, None
        return True, None
    if not isinstance(value, str) or not value.strip():
        col.bad(f"{where}: \"{key}\" is empty or not a string; write the caption")
        return False, None
    return True, value.strip()


def _read_metadata(root: Path, kind: str, col: _Collector, hashes: dict[str, str]) -> str:
    meta = root / METADATA_NAME
    need_caption = kind != "dreambooth"
    listed: set[Path] = set()
    for lineno, rec in _json_lines(meta, METADATA_NAME, col):
        where = f"{METADATA_NAME} line {lineno}"
        fname = rec.get("file_name")
        if not isinstance(fname, str) or not fname:
            col.bad(f"{where}: missing \"file_name\"; name the image file")
            continue
        norm = fname.replace("\\", "/")
        if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in norm.split("/"):
            raise DatasetError.text(f"{where}: file_name {fname!r} must be a path relative to the "
                               f"{METADATA_NAME} folder, without '..'; fix it")
        img = root.joinpath(*[p for p in norm.split("/") if p not in ("", ".")])
        ok, text = _text_field(rec, "text", where, col, required=need_caption)
        if not ok:
            continue
        ok, teacher = _text_field(rec, "teacher_text", where, col, required=False)
        if not ok:
            continue
        if not img.is_file():
            col.bad(f"{where}: image {fname!r} not found next to {METADATA_NAME}; add it or fix the name")
            continue
        if img.suffix.lower() not in IMAGE_EXTENSIONS:
            col.bad(f"{fname}: not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                    "fix the file_name")
            continue
        listed.add(img)
        if _check_image(img, norm, col, hashes):
            col.items.append(Item(name=norm, image=img, text=text, teacher_text=teacher))
    for f in _visible(root):
        if f == meta or f in listed or f.suffix.lower() == CAPTION_EXTENSION:
            continue
        rel = f.relative_to(root).as_posix()
        if f.suffix.lower() in IMAGE_EXTENSIONS:
            if need_caption:
                col.bad(f"{rel}: no caption (not listed in {METADATA_NAME}); add a line for it")
        else:
            col.bad(f"{rel}: not an image, caption or {METADATA_NAME}; remove it")
    return "metadata"


def _read_prompts(path: Path, col: _Collector) -> None:
    if path.suffix.lower() == ".jsonl":
        for lineno, rec in _json_lines(path, path.name, col):
            where = f"{path.name} line {lineno}"
            ok, text = _text_field(rec, "text", where, col, required=True)
            if not ok:
                continue
            ok, teacher = _text_field(rec, "teacher_text", where, col, required=False)
            if ok:
                col.items.append(Item(name=f"line {lineno}", image=None, text=text, teacher_text=teacher))
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise DatasetError.text(f"{path.name}: not UTF-8 text; save it as UTF-8") from None
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                col.items.append(Item(name=f"line {lineno}", image=None, text=line.strip()))


def _digest(items: list[Item], hashes: dict[str, str]) -> str:
    """sha256 over the content (names, image bytes, prompts), independent of the container, so a
    folder and a zip of it hash alike."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: i.name):
        record = [it.name, hashes.get(it.name, ""), it.text or "", it.teacher_text or ""]
        h.update(json.dumps(record, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def load_dataset(path: str | os.PathLike, kind: str = "finetune", *, workdir: str | os.PathLike | None = None,
                 skip_bad: bool = False, max_bytes: int = MAX_EXTRACT_BYTES,
                 max_files: int = MAX_EXTRACT_FILES, max_pixels: int = MAX_IMAGE_PIXELS) -> LoadedDataset:
    """Read and fully validate a dataset. Archives are extracted into ``workdir/data`` (required
    for archives); the returned items point into that folder. Images above ``max_pixels`` (from
    their header, before decoding) are bad items."""
    if kind not in KINDS:
        raise DatasetError.text(f"unknown training kind {kind!r}; use one of {', '.join(KINDS)}")
    src = Path(path)
    if not src.exists():
        raise DatasetError("{path}: dataset not found; check the {data} path", path=src)
    col = _Collector(skip_bad, max_pixels)
    hashes: dict[str, str] = {}
    fmt = "folder"
    root: Path | None
    if src.is_file() and is_archive(src):
        if workdir is None:
            raise ValueError("load_dataset needs a workdir to extract archives into")
        fmt = "tar" if not src.name.lower().endswith(".zip") else "zip"
        dest = Path(workdir) / "data"
        if dest.exists():
            shutil.rmtree(dest)
        root = _dataset_root(safe_extract(src, dest, max_bytes=max_bytes, max_files=max_files))
    elif src.is_file() and src.name == METADATA_NAME:
        root = src.parent
    elif src.is_file() and src.suffix.lower() in PROMPTS_SUFFIXES:
        if kind != "distill":
            raise DatasetError.text(f"{src.name}: a prompts-only file works for distill only; {kind} needs "
                               "images: pass a folder, .zip or .tar(.gz) of images with captions")
        _read_prompts(src, col)
        fmt, root, layout = "prompts", None, "prompts"
    elif src.is_file():
        raise DatasetError.text(f"{src.name}: unsupported dataset file; pass a folder, .zip, .tar(.gz), "
                           f"{METADATA_NAME} or (distill) a prompts .txt/.jsonl")
    else:
        root = _dataset_root(src)
    if root is not None:
        if (root / METADATA_NAME).is_file():
            layout = _read_metadata(root, kind, col, hashes)
        else:
            layout = _read_captions_folder(root, kind, col, hashes)
    teacher = [it.teacher_text is not None for it in col.items]
    if any(teacher) and not all(teacher):
        missing = next(it.name for it in col.items if it.teacher_text is None)
        raise DatasetError.text(f"{missing}: no \"teacher_text\" while other items have one; give every "
                           "item a teacher_text or none")
    if not col.items:
        what = "prompts" if layout == "prompts" else "usable images"
        extra = f" ({len(col.skipped)} skipped as bad)" if col.skipped else ""
        raise DatasetError.text(f"{src.name}: no {what} found{extra}; add data to the dataset")
    info = DatasetInfo(format=fmt, num_items=len(col.items), has_teacher_text=all(teacher),
                       sha256=_digest(col.items, hashes), layout=layout,
                       num_skipped=len(col.skipped), skipped=list(col.skipped))
    return LoadedDataset(info=info, items=col.items, root=root)


def inspect_dataset(path: str | os.PathLike, kind: str = "finetune", *, skip_bad: bool = False,
                    max_bytes: int = MAX_EXTRACT_BYTES, max_files: int = MAX_EXTRACT_FILES,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> DatasetInfo:
    """Validate a dataset without training (archives go to a temporary folder that is removed)."""
    with tempfile.TemporaryDirectory(prefix="styleinject-inspect-") as tmp:
        return load_dataset(path, kind, workdir=tmp, skip_bad=skip_bad, max_bytes=max_bytes,
                            max_files=max_files, max_pixels=max_pixels).info


# --------------------------------------------------------------------------------------------
# Images to tensors, and a data order that can be resumed exactly
# --------------------------------------------------------------------------------------------


def preprocess_image(path: Path, resolution: int, *, center_crop: bool = True, flip: bool = False,
                     rng: random.Random | None = None) -> np.ndarray:
    """Resize the shorter side to ``resolution``, crop a square (centre, or random with ``rng``),
    optionally mirror; returns float32 CHW in [-1, 1]."""
    img = decode_image(path.read_bytes(), path.name).convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    if center_crop or rng is None:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = rng.randint(0, nw - resolution), rng.randint(0, nh - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class EpochSampler:
    """Endless shuffled order over ``num_items``: epoch ``e`` is a permutation drawn from
    ``(seed, e)``; each draw also carries an augmentation seed. The state is two integers
    (epoch, position), so a resumed run continues with exactly the same samples."""

    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        if num_items <= 0:
            raise ValueError("EpochSampler needs at least one item")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order: np.ndarray | None = None
        self._aug: np.ndarray | None = None

    def _epoch_arrays(self):
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(self.num_items) if self.shuffle else np.arange(self.num_items)
            self._order, self._aug = order, rng.integers(0, 2**31 - 1, size=self.num_items)
        return self._order, self._aug

    def next(self, n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            order, aug = self._epoch_arrays()
            out.append((int(order[self.pos]), int(aug[self.pos])))
            self.pos += 1
            if self.pos == self.num_items:
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "num_items": self.num_items, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError("data-order state belongs to a different dataset or seed")
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None


class ImageTextDataset:
    """Items -> ``{"pixel_values", "text", "teacher_text"}``; augmentation is drawn from the
    per-sample seed the :class:`EpochSampler` hands out, so it is part of the resumable order."""

    def __init__(self, items: list[Item], resolution: int, *, center_crop: bool = True,
                 random_flip: bool = False):
        if any(it.image is None for it in items):
            raise DatasetError.text("this training kind needs images; the dataset holds prompts only")
        self.items, self.resolution = items, resolution
        self.center_crop, self.random_flip = center_crop, random_flip

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int, aug_seed: int) -> np.ndarray:
        rng = random.Random(aug_seed)
        flip = self.random_flip and rng.random() < 0.5
        return preprocess_image(self.items[index].image, self.resolution, center_crop=self.center_crop,
                                flip=flip, rng=rng)

    def get(self, index: int, aug_seed: int) -> dict:
        item = self.items[index]
        return {"pixel_values": self.image(index, aug_seed), "text": item.text,
                "teacher_text": item.teacher_text}
