"""The supported surface (docs/DESIGN.md, "The public surface").

* ``ttamer_jax.__all__`` is what README.md, docs/*.md and the notebooks use at the top
  level (``tj.Name``, ``from ttamer_jax import Name``), at most 70 names: every name the
  docs use is there and every name there is used.
* Each layer's ``__all__`` (``tj.core``, ``tj.data``, ``tj.evaluation``, ``tj.networks``)
  resolves, and one object has one supported name across all of them (no alias pairs).
* Every function in ``ttamer_jax.__all__`` (and every function of core/relaxation.py, the
  ones a training loss uses) has a docstring with ``Args:`` and ``Returns:`` sections;
  every class documents its fields (``Attributes``) or constructor (``Args:``).
"""

import glob
import inspect
import json
import os
import re

import pytest

import ttamer_jax as tj
from ttamer_jax.core import relaxation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("core", "data", "evaluation", "networks")
MAX_TOP_LEVEL = 70


def _doc_texts():
  paths = ([os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
           + sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb"))))
  for path in paths:
    if path.endswith(".ipynb"):
      with open(path, encoding="utf-8") as f:
        cells = json.load(f)["cells"]
      yield path, "\n".join("".join(c["source"]) for c in cells)
    else:
      with open(path, encoding="utf-8") as f:
        yield path, f.read()


def _top_level_uses() -> dict[str, str]:
  """``{name: first file}`` of every ``tj.name`` / ``ttamer_jax.name`` / ``from
  ttamer_jax import name`` in the docs (subpackages and dunders aside)."""
  used = {}
  for path, text in _doc_texts():
    names = re.findall(r"(?<![\w.])(?:tj|ttamer_jax)\.(\w+)", text)
    for m in re.finditer(r"from ttamer_jax import \(?([\w\s,]+)\)?", text):
      names += re.findall(r"\w+", m.group(1).split(" as ")[0])
    for name in names:
      if name not in LAYERS + ("app",) and not name.startswith("_"):
        used.setdefault(name, os.path.relpath(path, REPO))
  return used


USED = _top_level_uses()


def test_top_level_is_what_the_docs_use():
  names = set(tj.__all__) - {"__version__"}
  assert len(tj.__all__) <= MAX_TOP_LEVEL, f"{len(tj.__all__)} top-level names (aim: <= 70)"
  missing = {n: f for n, f in USED.items() if n not in names}
  assert not missing, ("the docs use names that are not in ttamer_jax.__all__ (add them, or "
                       f"write tj.<layer>.name): {missing}")
  unused = sorted(names - set(USED))
  assert not unused, ("names in ttamer_jax.__all__ that README, docs and notebooks never use "
                      f"(move them to their layer's __all__ only): {unused}")


def test_layer_names_resolve_and_have_one_name_each():
  seen = {}
  for layer in LAYERS:
    module = getattr(tj, layer)
    assert len(module.__all__) == len(set(module.__all__)), layer
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.ismodule(obj):
        continue
      if callable(obj):
        other = seen.setdefault(id(obj), f"{layer}.{name}")
        assert other.rpartition(".")[2] == name, f"{layer}.{name} is also {other}"
  for name in tj.__all__:
    obj = getattr(tj, name)
    if name == "replay":  # tj.core.replay is the module; the function is core.replay.replay
      assert obj is tj.core.replay.replay
    elif callable(obj):  # a top-level name is one of a layer's names, same spelling
      assert seen.get(id(obj), "").rpartition(".")[2] == name, name


def test_subpackages_and_internal_modules_stay_reachable():
  from ttamer_jax.core import replay as replay_module
  assert tj.core.replay is replay_module and callable(tj.replay)  # module vs function
  assert tj.evaluation.holm is tj.evaluation.drift.holm
  assert callable(tj.core.replay.replay_compiled)  # internal, but reachable
  assert set(dir(tj)) >= set(tj.__all__) | set(LAYERS)


def _documented_callables():
  for name in tj.__all__:
    obj = getattr(tj, name)
    if callable(obj):
      yield name, obj
  for name, obj in vars(relaxation).items():
    if inspect.isfunction(obj) and obj.__module__ == relaxation.__name__ and name[0] != "_":
      yield f"core.relaxation.{name}", obj


DOCUMENTED = dict(_documented_callables())


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_docstrings_document_arguments_and_results(name):
  obj = DOCUMENTED[name]
  doc = inspect.getdoc(obj) or ""
  if isinstance(obj, type):
    assert "Attributes" in doc or "Args:" in doc, f"class {name}: document its fields"
  else:
    missing = [s for s in ("Args:", "Returns:") if s not in doc]
    assert not missing, f"{name}: docstring lacks {missing}"
    returns = doc.split("Returns:", 1)[1].split("\n\n", 1)[0]
    shaped = re.search(r"\[[\w\s,.+\-*/]*\]", doc)  # ``[N, n]``, ``[]``
    typed = re.search(r":class:|None|float|dict|tuple|DataFrame|network", returns)
    assert shaped or typed, f"{name}: give the shapes of its arrays (``[N, n]``) or the type returned"
