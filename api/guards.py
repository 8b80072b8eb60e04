"""Request-body guards and safe JSON rendering: every bad body is a 4xx JSON message, never a 500.

``BodyGuard`` (pure ASGI middleware, so streaming responses pass untouched) reads the body of every
request except the streamed dataset upload, with a hard cap (``STYLEINJECT_MAX_JSON_BYTES``: 413,
from ``Content-Length`` up front or while the body arrives), and for JSON bodies (what FastAPI
parses as JSON: no content type, ``application/json`` or ``application/*+json``) refuses
non-finite numbers (``NaN``, ``Infinity``, ``1e400``: Python's ``json`` accepts them, JSON does
not), NUL characters (no database column can store them) and nesting deeper than
``STYLEINJECT_MAX_JSON_DEPTH`` (422); a NUL in the path or query is a 422 too. Malformed JSON is
left to FastAPI (422). The body is then handed on unchanged.

``SafeJSONResponse`` renders a non-finite float (say a diverged training loss) as ``null``
instead of failing the response, and ``finite()`` does the same for error details that echo input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from api.redact import redact

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Routes that stream their own body with their own cap (multipart uploads): (method, path).
STREAMED_BODIES = frozenset({("POST", "/datasets")})
_ECHO_CHARS = 200  # longest input an error message repeats back


class BadBody(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def _reject_constant(name: str) -> float:
    raise BadBody(422, f"invalid JSON body: {name} is not a JSON number; send a finite number (or null)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadBody(422, f"invalid JSON body: {text[:40]} is out of range for a number; send a finite number")
    return value


_NUL = "invalid request: a NUL character (\\u0000) is not allowed in {where}; remove it"


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON (iterative; stops counting past ``limit``); raises on NUL."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            raise BadBody(422, _NUL.format(where="a JSON body"))
        if isinstance(item, dict):
            if any("\x00" in key for key in item):
                raise BadBody(422, _NUL.format(where="a JSON body"))
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_json(body: bytes, max_depth: int) -> None:
    """Raise BadBody for non-finite numbers or too deep nesting; malformed JSON passes (FastAPI's 422)."""
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadBody(422, f"invalid JSON body: nested deeper than {max_depth} levels "
                           "(STYLEINJECT_MAX_JSON_DEPTH)") from None
    except (ValueError, UnicodeDecodeError):
        return
    if _depth(value, max_depth) > max_depth:
        raise BadBody(422, f"invalid JSON body: nested deeper than {max_depth} levels "
                           "(STYLEINJECT_MAX_JSON_DEPTH)")


def is_json_content_type(value: str | None) -> bool:
    if not value:
        return True  # FastAPI parses a body without a content type as JSON
    mime = value.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def finite(value: Any, _depth: int = 0) -> Any:
    """JSON-ready data with non-finite floats as strings, long strings cut and keys redacted (error details)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        value = redact(value)  # an error never repeats key material back
        return value[:_ECHO_CHARS] + "..." if len(value) > _ECHO_CHARS else value
    if _depth > 20:
        return "..."
    if isinstance(value, dict):
        return {str(k): finite(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, _depth + 1) for v in value]
    return value


def _nulls(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulls(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    """JSONResponse that writes non-finite floats as null (JSON has no NaN) instead of raising."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:
            return super().render(_nulls(content))


def _error(status_code: int, message: str) -> SafeJSONResponse:
    # a 422's detail is a list of field errors, like FastAPI's own (the OpenAPI schema says so)
    detail = [{"loc": ["request"], "msg": message, "type": "value_error"}] if status_code == 422 else None
    return SafeJSONResponse({"message": message, "detail": detail}, status_code=status_code)


class BodyGuard:
    """ASGI middleware: cap, and for JSON check, every request body except streamed uploads."""

    def __init__(self, app: Callable, max_bytes: int, max_depth: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").lower()
        if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
            await _error(422, _NUL.format(where="the path or query"))(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if (scope["method"], scope["path"].rstrip("/") or "/") in STREAMED_BODIES:
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"").decode("latin-1")
        too_big = (f"request body exceeds {self.max_bytes} bytes (STYLEINJECT_MAX_JSON_BYTES); "
                   "send a smaller body (datasets go to POST /datasets as multipart)")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _error(413, too_big)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        disconnect: Message | None = None
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnect = message
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _error(413, too_big)(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        content_type = headers.get(b"content-type")
        if body and disconnect is None and is_json_content_type(content_type.decode("latin-1") if content_type else None):
            try:
                check_json(body, self.max_depth)
            except BadBody as exc:
                await _error(exc.status_code, exc.message)(scope, receive, send)
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if disconnect is not None:
                return disconnect
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
