"""Run the Alembic migrations from code (`styleinject db upgrade`, `styleinject serve`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config


def _repo_root() -> Path:
    here = Path(__file__).resolve().parents[3]
    if (here / "migrations" / "env.py").is_file():
        return here
    if (Path.cwd() / "migrations" / "env.py").is_file():
        return Path.cwd()
    raise FileNotFoundError(
        "migrations/ not found next to the api package or in the current directory; "
        "run from the repository root (the Docker images use /app)"
    )


def alembic_config(database_url: str) -> Config:
    root = _repo_root()
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


class SchemaNotCurrent(RuntimeError):
    """The database has not been migrated to this code's schema (a first start, or an upgrade)."""


def check_current(database_url: str) -> None:
    """Raise SchemaNotCurrent, naming the fix, unless the database is at the migrations' head."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    heads = set(ScriptDirectory.from_config(alembic_config(database_url)).get_heads())
    url = make_url(database_url)
    current: set[str] = set()
    # a SQLite file that does not exist yet is a first start, not a connection problem
    if not (url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists()):
        engine = create_engine(database_url)
        try:
            with engine.connect() as connection:
                current = set(MigrationContext.configure(connection).get_current_heads())
        except OperationalError as exc:
            raise SchemaNotCurrent(f"cannot reach the database {url.render_as_string(hide_password=True)}: "
                                   f"{exc.orig}") from None
        finally:
            engine.dispose()
    if current != heads:
        state = f"at revision {', '.join(sorted(current))}" if current else "not initialised"
        raise SchemaNotCurrent(
            f"the database is {state} (this version needs {', '.join(sorted(heads))}): run "
            "`styleinject db upgrade` first (`styleinject serve` does it on start)")
