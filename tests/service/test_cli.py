"""The service commands: argparse-only import, apikey create/list/revoke, db upgrade, --help."""

from __future__ import annotations

import subprocess
import sys

from api.auth import authenticate
from api.core.db.session import session_scope
from api.core.settings import Settings
from tests.service.conftest import REPO, run_cli, service_env


def test_cli_module_imports_only_argparse():
    code = ("import sys; before = set(sys.modules); import api.cli; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "assert new <= {'api', 'argparse', 'gettext', 'locale'}, new")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_apikey_lifecycle(tmp_path):
    home = tmp_path / "home"
    env = service_env()
    run_cli("db", "upgrade", "--home", str(home), env=env)
    created = run_cli("apikey", "create", "--tenant", "alice", "--name", "ci", "--home", str(home), env=env)
    key = created.stdout.strip()
    assert key.startswith("si_") and len(key) > 40 and "shown only once" in created.stderr
    listing = run_cli("apikey", "list", "--home", str(home), env=env).stdout
    assert "alice" in listing and key[3:15] in listing and "active" in listing and key not in listing

    url = Settings(home=home).database_url
    with session_scope(url) as session:
        assert authenticate(session, key, None).name == "alice"
    run_cli("apikey", "revoke", key[3:15], "--home", str(home), env=env)
    assert "revoked" in run_cli("apikey", "list", "--tenant", "alice", "--home", str(home), env=env).stdout
    with session_scope(url) as session:
        assert authenticate(session, key, None) is None
    missing = subprocess.run([sys.executable, "-m", "api.cli", "apikey", "revoke", "nope", "--home", str(home)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no key matches" in missing.stderr


def test_row_commands_on_an_unmigrated_database_name_the_fix(tmp_path):
    env = service_env()
    for argv in (("model", "add", "sd15", "runwayml/stable-diffusion-v1-5"), ("model", "list"),
                 ("apikey", "create", "--tenant", "alice"), ("apikey", "list")):
        result = subprocess.run([sys.executable, "-m", "api.cli", *argv, "--home", str(tmp_path / "home")],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stderr
        assert "not initialised" in result.stderr and "styleinject db upgrade" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_styleinject_help_lists_the_service_commands():
    out = subprocess.run([sys.executable, "-m", "styleinject.cli", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for command in ("serve", "worker", "apikey", "db"):
        assert command in out
    serve = subprocess.run([sys.executable, "-m", "styleinject.cli", "serve", "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--home" in serve and "--port" in serve
    worker = subprocess.run([sys.executable, "-m", "styleinject.cli", "worker", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--queues" in worker and "--pool" in worker  # from worker.cli, via the entry point group


def test_worker_cli_module_imports_only_argparse():
    code = ("import sys; before = set(sys.modules); import worker.cli; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "assert new <= {'worker', 'argparse', 'gettext', 'locale'}, new")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_serve_refuses_a_busy_port_before_touching_home(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "styleinject.cli", "serve", "--home", str(tmp_path / "home"),
                              "--port", str(port)], cwd=REPO, env=service_env(), capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 2 and "cannot listen" in out.stderr and "--port" in out.stderr
    assert not (tmp_path / "home").exists()
