"""The package's shape: layers whose imports point down only, no import cycle, a
public namespace with unique names, and an ``import ttamer_jax`` that loads no
heavy optional dependency (docs/DESIGN.md, "Layers").

Imports are read from the source (``ast``), counting imports inside functions,
so a cycle held together by function-level imports fails here too.
"""

import ast
import os
import subprocess
import sys

import pytest

import ttamer_jax as tj

PACKAGE = os.path.dirname(tj.__file__)

# Rank of each layer; a module may import modules of its own or a lower rank.
LAYERS = {"core": 1, "data": 2, "evaluation": 3, "networks": 4, "app": 5}
# Leaf modules any layer may import; the facade re-exports core, data,
# evaluation and (lazily) networks, so only the application may import it.
SPECIAL = {"ttamer_jax._version": 0, "ttamer_jax": 4.5, "ttamer_jax.__main__": 6}
HEAVY = ("flax", "optax", "matplotlib", "pandas", "pyarrow", "sklearn", "tqdm")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        out[_module_name(path)] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The package module ``name`` refers to (a module, or the module defining a name)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(path: str, module: str) -> set[str]:
  """Package modules imported anywhere in ``path`` (top level and inside functions)."""
  tree = ast.parse(open(path).read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        parts = module.split(".")
        is_pkg = path.endswith("__init__.py")
        base = ".".join(parts[: len(parts) - node.level + (1 if is_pkg else 0)] +
                        ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      if name.split(".")[0] != "ttamer_jax":
        continue
      target = _resolve(name)
      if target and target != module:
        found.add(target)
  return found


GRAPH = {m: imports_of(p, m) for m, p in MODULES.items()}


def rank(module: str) -> float:
  if module in SPECIAL:
    return SPECIAL[module]
  return LAYERS[module.split(".")[1]]


def test_every_module_belongs_to_a_layer():
  stray = [m for m in MODULES if m not in SPECIAL and m.split(".")[1] not in LAYERS]
  assert not stray, f"modules outside the layers {sorted(LAYERS)}: {stray}"


def test_imports_point_down_only():
  upward = [f"{m} ({rank(m)}) -> {t} ({rank(t)})" for m, targets in GRAPH.items()
            for t in targets if rank(t) > rank(m)]
  assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(GRAPH[m]):
      if state.get(t) == "open":
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walker_sees_function_level_imports(tmp_path):
  path = tmp_path / "probe.py"
  path.write_text("def f():\n  from ttamer_jax.app import cli\n  import ttamer_jax.data.traces\n")
  assert imports_of(str(path), "ttamer_jax.core.probe") == {"ttamer_jax.app.cli",
                                                            "ttamer_jax.data.traces"}


def test_public_names_are_unique_and_resolve():
  assert len(tj.__all__) == len(set(tj.__all__))
  for name in tj.__all__:
    assert getattr(tj, name) is not None, name
  objects = {}
  for name in tj.__all__:
    obj = getattr(tj, name)
    if isinstance(obj, type) or callable(obj):
      assert id(obj) not in objects, f"{name} and {objects.get(id(obj))} are the same object"
      objects[id(obj)] = name
  assert callable(tj.sweep) and not isinstance(tj.sweep, type(tj))  # a function, not a module


def test_class_names_are_unique_across_the_package():
  seen = {}
  for m, path in MODULES.items():
    for node in ast.parse(open(path).read()).body:
      if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
        assert node.name not in seen, f"class {node.name} in {m} and {seen[node.name]}"
        seen[node.name] = m


def test_no_private_names_imported_across_modules():
  bad = []
  for m, path in MODULES.items():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ttamer_jax"):
        bad += [f"{m}: {node.module}.{a.name}" for a in node.names
                if a.name.startswith("_") and a.name != "__version__"]
  assert not bad, "private names imported across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("extra", ["pass", "tj.demo_cascade(); tj.load_traces_table"])
def test_import_loads_no_heavy_dependency(extra):
  code = (f"import sys, ttamer_jax as tj; {extra}; "
          f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", f"import ttamer_jax loaded {out.stdout.strip()}"


def test_network_names_load_on_first_use():
  code = ("import sys, ttamer_jax as tj; assert 'flax' not in sys.modules; "
          "tj.EarlyExitCNN; assert 'flax' in sys.modules; print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.stdout.strip() == "ok", out.stderr
