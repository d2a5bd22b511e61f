"""Every notebook under notebooks/ runs top to bottom (small sizes), so none can rot.

Each notebook is executed with nbclient in a fresh kernel of this interpreter,
with ``TTAMER_NOTEBOOK_SMALL=1`` (the notebooks shrink their sizes), in a
temporary working directory, and with the trained-network cache shared with
tests/test_cli.py (same quick digits checkpoint). A cell that raises fails the
test with the cell's traceback; the notebooks also assert their own claims
(hindsight <= recall <= no-recall, Monte-Carlo within 4 standard errors, ...).
"""

import base64
import concurrent.futures
import glob
import importlib.util
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS]
KERNEL = "ttamer-notebook-test"
CELL_TIMEOUT_S = 300

# What each notebook must print or produce (beyond running without an error).
EXPECTED_TEXT = {
    "quickstart": ["hindsight", "Monte-Carlo", "no-recall / recall", "held-out objective"],
    "early_exit_flax": ["test accuracy per exit", "served accuracy", "served exit == replayed exit"],
    "relaxation": ["tuned_with_recall", "dJ/dc finite differences", "serving cost of the batch"],
    "sharded_sweeps": ["4 devices", "spot checks and shard='lams' agree"],
}
EXPECTED_FILES = {  # each notebook writes into one output folder, and prints every path
    "quickstart": ["quickstart_out/index_heatmap.png"],
    "early_exit_flax": ["early_exit_flax_out/digits_policy.npz",
                        "early_exit_flax_out/digits_index.png",
                        "early_exit_flax_out/digits_pareto.png"],
    "relaxation": [],
    "sharded_sweeps": [],
}


def _sync_script():
  spec = importlib.util.spec_from_file_location(
      "sync_notebooks", os.path.join(REPO, "scripts", "sync_notebooks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sync_notebooks = _sync_script()
URL = sync_notebooks.repository_url()


def test_every_notebook_is_covered():
  assert sorted(NAMES) == sorted(EXPECTED_TEXT) == sorted(EXPECTED_FILES)


def test_the_repository_url_lives_in_pyproject():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert URL == project["urls"]["Repository"] and URL.startswith("https://")
  assert "plot" not in project["optional-dependencies"]  # obsolete: matplotlib is a core dependency
  # The README's first command (pip install -e .) installs what CSV / Parquet traces need.
  assert {"pandas", "pyarrow"} <= {d.split(">")[0].split("=")[0] for d in project["dependencies"]}
  assert f"git+{URL}\"" in sync_notebooks.install_cell()
  assert sync_notebooks.install_cell("https://example.org/fork").count("https://example.org/fork") == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_committed_clean_with_the_install_cell_first(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  # Exactly the template of scripts/sync_notebooks.py with pyproject.toml's URL.
  assert code[0].source == sync_notebooks.install_cell(URL)
  assert "[plot]" not in json.dumps(nb)
  assert "TTAMER_NOTEBOOK_SMALL" in code[1].source
  # Committed without outputs: nothing stale to review, nothing to rot.
  assert all(not c.outputs and c.execution_count is None for c in code)


def _run_install_cell(monkeypatch, *, installed):
  """Executes the install cell as IPython would, with ttamer_jax importable or not
  (``installed``) and ``%pip`` replaced by a recorder: the magics it ran."""
  from IPython.core.inputtransformer2 import TransformerManager

  code = TransformerManager().transform_cell(sync_notebooks.install_cell(URL))
  calls = []

  class Shell:
    def run_line_magic(self, name, line):
      calls.append((name, line))

  if not installed:
    monkeypatch.setitem(sys.modules, "ttamer_jax", None)   # import ttamer_jax -> ImportError
  exec(compile(code, "install_cell", "exec"), {"get_ipython": Shell})
  return calls


def test_install_cell_does_nothing_when_ttamer_jax_is_importable(monkeypatch):
  assert _run_install_cell(monkeypatch, installed=True) == []


def test_install_cell_installs_from_the_repository_otherwise(monkeypatch):
  # Colab's /content, a fresh environment: one pip install from pyproject.toml's URL.
  assert _run_install_cell(monkeypatch, installed=False) == [
      ("pip", f'install -q "ttamer-jax @ git+{URL}"')]
  assert len(sync_notebooks.install_cell(URL).splitlines()) <= 5


def _kernel_env(tmp_path_factory, cache):
  """Environment of the kernels: a kernelspec running this interpreter (not whatever
  `python` is on PATH), the small sizes, the shared cache, this checkout."""
  share = tmp_path_factory.mktemp("jupyter")
  spec = share / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "ttamer test kernel", "language": "python"}))
  return {"JUPYTER_PATH": str(share), "TTAMER_NOTEBOOK_SMALL": "1", "TTAMER_CACHE": cache,
          "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
          "JAX_PLATFORMS": "cpu", "XLA_FLAGS": None, "MPLBACKEND": None}  # None: unset


def _execute(path, workdir):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(workdir)}})
  try:
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
  except Exception as e:  # noqa: BLE001 -- reported by the notebook's own test
    return nb, e
  return nb, None


@pytest.fixture(scope="module")
def executed(tmp_path_factory, ttamer_cache):
  """Every notebook executed, two kernels at a time (most of a run is single-threaded
  compilation, so two share the CI's two cores well)."""
  env = _kernel_env(tmp_path_factory, ttamer_cache)
  saved = {k: os.environ.get(k) for k in env}
  for key, value in env.items():  # kernel processes inherit the environment
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  try:
    dirs = {name: tmp_path_factory.mktemp(name) for name in NAMES}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
      # Longest first, so the two workers finish together.
      order = sorted(zip(NAMES, NOTEBOOKS), key=lambda x: x[0] != "early_exit_flax")
      futures = {name: pool.submit(_execute, path, dirs[name]) for name, path in order}
      return {name: (*f.result(), dirs[name]) for name, f in futures.items()}
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def _outputs(nb):
  texts, images = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        texts.append(out.text)
      elif out.output_type in ("display_data", "execute_result"):
        texts.append(out.get("data", {}).get("text/plain", ""))
        png = out.get("data", {}).get("image/png")
        if png:
          assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
          images += 1
  return "".join(texts), images


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(executed, name):
  nb, error, workdir = executed[name]
  if error is not None:
    raise error
  text, images = _outputs(nb)
  for fragment in EXPECTED_TEXT[name]:
    assert fragment in text, fragment
  assert images >= 1
  for filename in EXPECTED_FILES[name]:
    assert (workdir / filename).stat().st_size > 0
    # printed with its full path, and named in the notebook's text before it is written
    assert f"wrote {workdir / filename}" in text, filename
    prose = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert filename.split("/")[0] + "/" in prose, filename
