"""The suite runs without the optional dependencies: ``pip install -e .[dev] && pytest`` must not stop
at collection when torchvision (the ``vision`` extra) is missing (issue 15, item 18)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_suite_collects_without_torchvision():
    code = ("import sys; sys.modules['torchvision'] = None  # as if not installed\n"
            "import pytest\n"
            "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.lower().splitlines()[-1], proc.stdout[-3000:]
