import os
import sys

# The NumPy references live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
  """Drop the compiled programs of the previous test module. One pytest process runs the
  whole suite: kept, thousands of XLA:CPU executables pile up (GBs of RSS and memory
  mappings), and a late large compilation crashed inside XLA (fit_answer_model in
  test_selection.py, in two full runs; never when that module ran alone)."""
  jax.clear_caches()
  yield
