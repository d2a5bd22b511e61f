import os
import sys

# The NumPy references live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# One persistent compilation cache for the whole run, shared by pytest-xdist's workers
# and the suite's own pytest subprocesses (they inherit the variable): a program
# compiled by one test module is loaded, not compiled again, by the next module (the
# in-memory caches are cleared between modules, below) and by the other worker. Set in
# JAX's config: the `ttamer` subprocesses that count their own compilations stay cold.
_OWNER = "TTAMER_TEST_XLA_CACHE" not in os.environ
XLA_CACHE = os.environ.setdefault(
    "TTAMER_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), f"ttamer_jax_tests_xla_{os.getpid()}"))
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)
# Likewise one $TTAMER_CACHE (trained networks, and the `ttamer` subprocesses' compiled
# programs) for the modules that run the demo's network in subprocesses (test_cli.py's
# `world`, test_notebooks.py), whichever worker runs them: the network is trained once.
TTAMER_CACHE = os.environ.setdefault(
    "TTAMER_TEST_CACHE", os.path.join(tempfile.gettempdir(), f"ttamer_jax_tests_cache_{os.getpid()}"))


def pytest_unconfigure(config):
  if _OWNER:   # the process that chose the folders (xdist's controller) removes them
    shutil.rmtree(XLA_CACHE, ignore_errors=True)
    shutil.rmtree(TTAMER_CACHE, ignore_errors=True)


# The modules that take longest, longest first (measured: BENCHMARKS.md, "The test suite").
# pytest-xdist's --dist loadfile hands whole modules to its workers in collection order;
# by default it first reorders them by their number of tests, which put the long modules
# with few tests (the notebooks, the float64 re-run) last, where one worker ran them alone.
LONGEST_FIRST = ("test_serving.py", "test_cli.py", "test_sweep.py", "test_relaxation.py",
                 "test_crossfit.py", "test_solvers.py", "test_counting.py", "test_workloads.py",
                 "test_long_process.py", "test_model.py", "test_bench.py", "test_notebooks.py",
                 "test_numerics.py", "test_slo.py", "test_fuzz_cli.py", "test_docs.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a module


@pytest.fixture(scope="session")
def ttamer_cache():
  """The run's shared ``$TTAMER_CACHE`` folder (see above)."""
  os.makedirs(TTAMER_CACHE, exist_ok=True)
  return TTAMER_CACHE


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
  """Drop the compiled programs of the previous test module. One pytest process runs the
  whole suite: kept, thousands of XLA:CPU executables pile up (GBs of RSS and memory
  mappings), and a late large compilation crashed inside XLA (fit_answer_model in
  test_selection.py, in two full runs; never when that module ran alone)."""
  jax.clear_caches()
  yield
