"""The model registry: base and teacher models an admin registered by name.

Tenants name a registered model in ``POST /train`` (``base_model``, ``teacher_model``); a name that
is not registered is a 422 that says nothing about the server's files or the hub, and nothing is
queued. Admins register models with ``styleinject model add NAME SOURCE`` or ``POST /models``;
``SOURCE`` is what the worker loads: a hub id, a local diffusers folder, or a single-file
``.safetensors`` checkpoint (teachers from community checkpoints). ``styleinject serve`` registers
the packaged toy demo model as ``demo`` on its first start.
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.db.models import RegisteredModel

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
DEMO_MODEL = "demo"


class RegistryError(ValueError):
    pass


def check_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise RegistryError(f"model name {name[:100]!r} must be 1-100 letters, digits, '.', '_' or '-' "
                            "(starting with a letter or digit)")
    return name


def check_source(source: str) -> str:
    source = source.strip()
    if not source or len(source) > 1000 or any(ord(c) < 32 for c in source):
        raise RegistryError("model source must be a hub id (owner/name), a folder or a .safetensors file, "
                            "at most 1000 characters")
    return source


def add_model(session: Session, name: str, source: str, *, replace: bool = False) -> RegisteredModel:
    name, source = check_name(name), check_source(source)
    row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if row is not None and not replace:
        raise RegistryError(f"model {name!r} is already registered ({row.source}); remove it first or replace it")
    if row is None:
        row = RegisteredModel(name=name, source=source)
        session.add(row)
    else:
        row.source = source
    session.flush()
    return row


def remove_model(session: Session, name: str) -> bool:
    row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if row is None:
        return False
    session.delete(row)
    session.flush()
    return True


def list_models(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))


def resolve_model(session: Session, name: str) -> str | None:
    """The source of a registered model, or None (the caller answers 422 without details)."""
    return session.scalar(select(RegisteredModel.source).where(RegisteredModel.name == name))


def display_name(session: Session, source: str, name: str | None = None) -> str:
    """What tenants see for a model an adapter or job uses: its registered name (``name``, the one the
    job was submitted with, if still registered with that source; else any name registered for the
    source), never a server path. An unregistered hub id is public and shown as is."""
    names = list(session.scalars(select(RegisteredModel.name).where(RegisteredModel.source == source)
                                 .order_by(RegisteredModel.name)))
    if name in names or (name and not names):
        return name
    if names:
        return names[0]
    return source if re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", source) and ".." not in source else "unregistered"


def register_demo_model(session: Session) -> bool:
    """Register the packaged toy model as ``demo`` unless that name is taken (first start)."""
    if resolve_model(session, DEMO_MODEL) is not None:
        return False
    from styleinject.assets import TOY_BASE

    add_model(session, DEMO_MODEL, str(TOY_BASE))
    return True
