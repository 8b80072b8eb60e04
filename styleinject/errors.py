"""User-facing errors that name options by *field*, so each front end can use its own words.

The library never writes a command-line flag into a message. It writes a template with ``{field}``
placeholders and passes user-provided text (file names, values) as context::

    raise TrainingError("{learning_rate} must be > 0 (got {got})", got=-1.0)

``str(exc)`` renders every field as its bare name (``learning_rate must be > 0 (got -1.0)``); the
CLI renders it with its field -> flag map (``--lr must be > 0 ...``); the API with
:func:`api_message` (JSON field names, never a ``--``). A placeholder whose name is a context key
is that value (conversions and format specs work: ``{value!r}``, ``{size:.1f}``); every other
placeholder is a field. Context values are inserted as they are, never parsed as templates, so
braces in file names are safe.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["API_FIELD_NAMES", "FieldError", "api_message", "first_line", "option_names", "render_message"]

_FORMATTER = string.Formatter()


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _convert(value: Any, conversion: str | None, spec: str) -> str:
    if conversion == "r":
        value = repr(value)
    elif conversion == "s":
        value = str(value)
    elif conversion == "a":
        value = ascii(value)
    return format(value, spec) if spec else str(value)


class FieldError(ValueError):
    """A user-facing error whose message refers to options by field name.

    template: text with ``{field}`` placeholders, e.g. ``"{learning_rate} must be > 0 (got {got})"``.
    context: values for the placeholders that are not fields (user text goes here, never into the
    template). ``fields``: the field names the template uses, in order of first use.
    ``str(exc)`` renders each field placeholder as the bare field name (``learning_rate``).
    """

    def __init__(self, template: str, **context: Any) -> None:
        self.template = template
        self.context = context
        self._parts = list(_FORMATTER.parse(template))  # raises ValueError on a malformed template
        seen: dict[str, None] = {}
        for _literal, name, _spec, _conv in self._parts:
            if name is not None and name not in context:
                if not name or not name.replace("_", "").replace(".", "").isalnum():
                    raise ValueError(f"FieldError template has a bad placeholder {{{name}}}: {template!r}")
                seen.setdefault(name, None)
        self.fields: tuple[str, ...] = tuple(seen)
        super().__init__(self.render({}))

    @classmethod
    def text(cls, message: str) -> FieldError:
        """An error from plain text that names no field (braces in ``message`` stay as they are)."""
        return cls("{message}", message=message)

    def render(self, names: Mapping[str, str] | Callable[[str], str]) -> str:
        """The message with each field written as ``names[field]`` (fields missing from a mapping
        keep their bare name); a callable gets the field name and returns the word to use."""
        lookup = names if callable(names) else (lambda field: names.get(field, field))
        out = []
        for literal, name, spec, conv in self._parts:
            out.append(literal)
            if name is None:
                continue
            if name in self.context:
                out.append(_convert(self.context[name], conv, spec or ""))
            else:
                out.append(lookup(name))
        return "".join(out)

    @classmethod
    def joined(cls, errors: Iterable[FieldError], sep: str = "; ") -> FieldError:
        """One error of this class whose message is the messages of ``errors`` joined by ``sep``."""
        pieces, context = [], {}
        for i, error in enumerate(errors):
            piece = []
            for literal, name, spec, conv in error._parts:
                piece.append(_escape(literal))
                if name is None:
                    continue
                if name in error.context:
                    key = f"_{i}_{name}"
                    context[key] = error.context[name]
                    name = key
                piece.append("{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}")
            pieces.append("".join(piece))
        return cls(_escape(sep).join(pieces), **context)

    def __reduce__(self):  # picklable although __init__ takes a template and keywords
        return (_rebuild, (type(self), self.template, self.context))


def _rebuild(cls: type[FieldError], template: str, context: dict) -> FieldError:
    return cls(template, **context)


# Field names (dataclass fields of TrainConfig, eval options) that the HTTP API spells differently.
# Fields not listed keep their name (the API uses TrainConfig's names: learning_rate, base_model...).
API_FIELD_NAMES: dict[str, str] = {
    "data": "dataset_id",
    # scorer weights come from the server setting STYLEINJECT_SCORER_PATHS (key per model)
    "clip_model": "STYLEINJECT_SCORER_PATHS.clipscore",
    "pickscore_model": "STYLEINJECT_SCORER_PATHS.pickscore",
    "pickscore_processor": "STYLEINJECT_SCORER_PATHS.pickscore_processor",
    "imagereward_model": "STYLEINJECT_SCORER_PATHS.imagereward",
    "imagereward_tokenizer": "STYLEINJECT_SCORER_PATHS.imagereward_tokenizer",
}


def render_message(exc: BaseException, names: Mapping[str, str] | Callable[[str], str]) -> str:
    """``exc.render(names)`` for a FieldError, ``str(exc)`` for anything else."""
    if isinstance(exc, FieldError):
        return exc.render(names)
    return str(exc)


def api_message(exc: BaseException, renames: Mapping[str, str] | None = None) -> str:
    """The message for an HTTP client: fields as API JSON field names (``API_FIELD_NAMES``, updated
    by ``renames``). A non-FieldError gets ``str(exc)``; no command-line flag comes from here."""
    names = {**API_FIELD_NAMES, **(renames or {})}
    return render_message(exc, names)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): for ``(cause)`` asides."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def option_names(parser, aliases: Mapping[str, str] | None = None) -> dict[str, str]:
    """Field -> command-line flag for an argparse parser: each option's ``dest`` (the field it sets)
    -> its first long option string, so the map cannot drift from the parser. ``aliases`` adds
    field -> flag pairs for fields an option sets under another name."""
    out: dict[str, str] = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in ("help", "version"):
            out.setdefault(action.dest, longs[0])
    out.update(aliases or {})
    return out
