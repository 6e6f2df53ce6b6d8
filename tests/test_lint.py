"""The whole tree passes ruff (STYLE.md 11: one linter, configured in ruff.toml)."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    assert ruff, "ruff is missing: install the test extra (pip install -e '.[test]')"
    out = subprocess.run([ruff, "check", "--exclude", ".venv", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
