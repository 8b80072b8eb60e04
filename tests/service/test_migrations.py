"""Alembic: upgrade head / downgrade base on SQLite and PostgreSQL; migrations match the models."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from api.core.db.migrate import alembic_config, downgrade, upgrade
from api.core.db.models import Base
from tests.service.conftest import REPO, service_env

TABLES = {"tenants", "api_keys", "datasets", "jobs", "job_events", "adapters", "checkpoints", "eval_scores",
          "generation_requests", "models", "webhook_deliveries"}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return request.getfixturevalue("make_pg_database")()


def test_upgrade_check_downgrade(database_url):
    assert set(Base.metadata.tables) == TABLES
    upgrade(database_url)
    assert _tables(database_url) == TABLES | {"alembic_version"}
    command.check(alembic_config(database_url))  # raises if the models drifted from the migrations
    downgrade(database_url, "base")
    assert _tables(database_url) <= {"alembic_version"}
    upgrade(database_url)  # and back up again
    assert TABLES <= _tables(database_url)


def test_alembic_command_line_reads_the_app_settings(database_url, tmp_path):
    env = service_env(database_url=database_url, home=tmp_path / "home")
    for args in (["upgrade", "head"], ["current"], ["downgrade", "base"]):
        done = subprocess.run([sys.executable, "-m", "alembic", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert _tables(database_url) <= {"alembic_version"}
