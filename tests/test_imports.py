import subprocess
import sys


def test_dataset_validation_imports_without_torch():
    """The API image has no torch: dataset checks and the CLI parser must not pull it in."""
    code = ("import sys, styleinject.train.data, styleinject.cli; styleinject.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_api_process_never_loads_the_worker_package(tmp_path):
    """api sends tasks by name: building the app and its Celery client loads no worker code."""
    code = ("import sys; from api.core.settings import Settings; import api.main; "
            f"api.main.create_app(Settings(home={str(tmp_path)!r})); "
            "print(sorted(m for m in sys.modules if m == 'worker' or m.startswith('worker.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_api_schemas_take_library_defaults_without_torch():
    """The schemas read TrainConfig / StyleInjectConfig defaults; those config modules load no torch."""
    code = ("import sys, api.schemas; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
