"""The repository is clean under its ruff configuration (pyproject.toml, [tool.ruff]):
pycodestyle errors and warnings, unused names and imports, import order."""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (it is in the test extra: pip install -e '.[test]')")
def test_ruff_is_clean():
  out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", REPO],
                       capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, f"ruff check reports:\n{out.stdout}{out.stderr}"
