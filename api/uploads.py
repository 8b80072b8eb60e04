"""Stream one multipart file field straight to disk, stopping as soon as it passes a size cap.

Starlette's ``request.form()`` spools the whole body first and has no total cap, so uploads are
parsed here with python-multipart's push parser while the body arrives.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import python_multipart as multipart
from python_multipart.multipart import parse_options_header
from fastapi import HTTPException
from starlette.requests import ClientDisconnect, Request

from api.core.storage import UPLOADS, ArtifactStore

from styleinject.names import DATASET_FILE_SUFFIXES

ACCEPTED_SUFFIXES = DATASET_FILE_SUFFIXES


# How the library's option fields read in an upload's error message (POST /datasets).
UPLOAD_FIELD_NAMES = {"skip_bad": "skip_bad=true (POST /datasets?skip_bad=true)", "data": "the uploaded file"}


def library_error_message(exc: BaseException, renames: dict[str, str] | None = None) -> str:
    """A library error for an HTTP client: options named as the API names them, never a CLI flag
    (``styleinject.errors.api_message``; plain ``str(exc)`` for other errors)."""
    from styleinject.errors import api_message

    return api_message(exc, {**UPLOAD_FIELD_NAMES, **(renames or {})})


class UploadError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


DATASET_TYPES = ("a .zip, .tar, .tar.gz or .tgz of images with same-name .txt captions (or a metadata.jsonl), "
                 "or, for distillation, a prompts .txt/.jsonl")


def upload_suffix(filename: str, suffixes: tuple[str, ...] = ACCEPTED_SUFFIXES) -> str | None:
    lower = filename.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if lower.endswith(suffix):
            return suffix
    return None


def safe_filename(filename: str) -> str:
    """The last path component, with anything but [A-Za-z0-9._-] replaced; never empty or dotted."""
    name = PureWindowsPath(PurePosixPath(filename).name).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[-200:]
    return name or "upload"


async def receive_file(request: Request, field: str, dest_dir: Path, max_bytes: int, *,
                       suffixes: tuple[str, ...] = ACCEPTED_SUFFIXES, what: str = "dataset",
                       types: str = DATASET_TYPES) -> tuple[Path, str, int]:
    """Write the multipart field ``field`` to ``dest_dir``; returns (path, original name, size).

    ``suffixes``: the accepted file name endings; ``what`` and ``types`` word the errors (the
    upload's name, and the accepted types as a phrase).

    Raises UploadError (400/413/415/422). The caller removes ``dest_dir`` on error.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, f"send the {what} as multipart/form-data with the file in field '{field}'")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise UploadError(413, f"upload is {int(declared)} bytes; the limit is {max_bytes} bytes "
                               "(STYLEINJECT_MAX_UPLOAD_BYTES)")

    state: dict = {"headers": {}, "name": b"", "value": b"", "file": None, "target": None}
    result: dict = {}
    pending: list[bytes] = []

    def on_part_begin() -> None:
        state["headers"] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["name"].lower()] = state["value"]
        state["name"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        state["target"] = None
        if name != field:
            return
        if "path" in result:
            raise UploadError(422, f"send exactly one file in field '{field}'")
        # NUL and other control characters: no database column stores a NUL, and names are for humans
        original = re.sub(r"[\x00-\x1f\x7f]", "", options.get(b"filename", b"").decode("utf-8", "replace"))
        if not original:
            raise UploadError(422, f"field '{field}' must be a file (with a filename)")
        suffix = upload_suffix(original, suffixes)
        if suffix is None:
            raise UploadError(415, f"{original!r}: unsupported file type; upload {types}")
        stem = safe_filename(original)
        if upload_suffix(stem, suffixes) != suffix:
            stem = f"upload{suffix}"
        path = dest_dir / stem
        result.update(path=path, original=original, size=0)
        state["file"] = open(path, "wb")  # noqa: SIM115 - closed in on_part_end / finally
        state["target"] = state["file"]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["target"] is None:
            return
        result["size"] += end - start
        if result["size"] > max_bytes:
            raise UploadError(413, f"upload exceeds the limit of {max_bytes} bytes "
                                   "(STYLEINJECT_MAX_UPLOAD_BYTES)")
        pending.append(data[start:end])

    def on_part_end() -> None:
        if state["target"] is not None:
            state["target"].write(b"".join(pending))
            pending.clear()
            state["target"].close()
            state["target"] = None

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    }
    dest_dir.mkdir(parents=True, exist_ok=True)
    parser = multipart.MultipartParser(params[b"boundary"], callbacks)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if pending and state["target"] is not None:
                state["target"].write(b"".join(pending))
                pending.clear()
        parser.finalize()
    except UploadError:
        raise
    except ClientDisconnect as exc:
        raise UploadError(400, "the client disconnected before the upload finished") from exc
    except multipart.exceptions.FormParserError as exc:
        raise UploadError(400, f"malformed multipart body: {exc}") from exc
    finally:
        if state["file"] is not None and not state["file"].closed:
            state["file"].close()
    if "path" not in result:
        raise UploadError(422, f"multipart field '{field}' (the {what} file) is missing")
    return result["path"], result["original"], result["size"]


@asynccontextmanager
async def staged(store: ArtifactStore, kind: str, item_id: str) -> AsyncIterator[None]:
    """Receiving and validating an upload into ``store``'s ``kind``/``item_id``: on any failure the
    half-made item is deleted (an ``UploadError`` becomes its HTTP answer); the raw upload always is."""
    try:
        yield
    except UploadError as exc:
        store.delete(kind, item_id)
        raise HTTPException(exc.status_code, exc.message) from None
    except BaseException:
        store.delete(kind, item_id)
        raise
    finally:
        store.delete(UPLOADS, item_id)
