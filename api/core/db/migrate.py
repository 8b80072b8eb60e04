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
