import subprocess
import sys


def test_dataset_validation_imports_without_torch():
    """The API image has no torch: dataset checks and the CLI parser must not pull it in."""
    code = ("import sys, styleinject.train.data, styleinject.cli; styleinject.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
