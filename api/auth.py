"""API keys: ``si_<prefix>_<secret>``, stored as (prefix, SHA-256), compared in constant time.

Keys are 256-bit random tokens, so a fast hash is enough (as for GitHub or Stripe tokens): a slow
password hash only helps against guessable secrets. The public prefix finds the row; the digest
comparison uses ``hmac.compare_digest``. ``STYLEINJECT_BOOTSTRAP_KEY`` is one extra key, never
stored, that authenticates as tenant ``admin`` (for automation and first start).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.db.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "si_"
BOOTSTRAP_TENANT = "admin"
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new key and its public prefix."""
    prefix = secrets.token_hex(6)
    return f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}", prefix


def key_prefix(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    prefix, sep, _ = key[len(KEY_PREFIX):].partition("_")
    return prefix if sep and len(prefix) == 12 else None


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, tenant_name: str, name: str | None = None) -> tuple[str, ApiKey]:
    """Create a key for a tenant (created if new). The caller commits and shows the key once."""
    tenant = get_or_create_tenant(session, tenant_name)
    key, prefix = generate_key()
    row = ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(key), name=name)
    session.add(row)
    session.flush()
    return key, row


def first_start_key(session: Session) -> str | None:
    """A key for tenant ``admin`` when the database has no key at all (a fresh embedded install)."""
    if session.scalar(select(ApiKey.id).limit(1)) is not None:
        return None
    key, _ = create_api_key(session, BOOTSTRAP_TENANT, name="first start")
    return key


def revoke_api_key(session: Session, prefix_or_id: str) -> ApiKey | None:
    prefix = key_prefix(prefix_or_id) or prefix_or_id
    row = session.scalar(
        select(ApiKey).where((ApiKey.prefix == prefix) | (ApiKey.id == prefix_or_id))
    )
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def authenticate(session: Session, key: str, bootstrap_key: str | None) -> Tenant | None:
    """The tenant a key belongs to, or None. Commits only a coarse ``last_used_at``."""
    if bootstrap_key and hmac.compare_digest(key.encode(), bootstrap_key.encode()):
        tenant = get_or_create_tenant(session, BOOTSTRAP_TENANT)
        session.commit()
        return tenant
    prefix = key_prefix(key)
    row = None
    if prefix is not None:
        row = session.scalar(
            select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        )
    # Compare against a dummy digest when no row matched, so timing does not reveal prefixes.
    if not hmac.compare_digest(hash_key(key), row.key_hash if row else _DUMMY_HASH) or row is None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.commit()
    return row.tenant
