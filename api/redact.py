"""Keep API keys out of logs: a logging filter that redacts key material in every record.

Redacted: API keys (``si_<prefix>_<secret>``), ``Bearer`` credentials, and the value of any
``key`` / ``api_key`` / ``token`` query parameter (an old dashboard link, ``/dashboard?key=...``,
still reaches the access log before it is redirected). The uvicorn access logger passes its fields
as ``record.args`` (its formatter unpacks them), so strings are redacted in place, keeping the shape.
"""

from __future__ import annotations

import logging
import re
from typing import Any

REDACTED = "[redacted]"
_PATTERNS = (
    (re.compile(r"si_[0-9a-f]{12}_[A-Za-z0-9_\-]+"), REDACTED),
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)([?&;](?:key|api_key|apikey|token|access_token)=)[^&;\s\"']*"), r"\1" + REDACTED),
)
# Loggers whose records (and handlers) get the filter: uvicorn's access and error logs, ours, the root.
LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn", "api", "")


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_arg(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        return True


def install_log_redaction() -> None:
    """Add the filter to the loggers above and their current handlers (idempotent). Logger
    filters survive uvicorn's later ``dictConfig`` (it replaces handlers, not filters)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, RedactingFilter) for f in target.filters):
                target.addFilter(RedactingFilter())
