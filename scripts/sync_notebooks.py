"""Writes the install cell (one template) into every notebook under notebooks/.

The first code cell of each notebook is Colab's one-line habit: import ttamer_jax,
else ``%pip install`` it from the project's public repository, whose URL is read from
``[project.urls] Repository`` in pyproject.toml (the one place to change it). Run
from a checkout, install it first (README's first command); the cell is then a no-op.

    python scripts/sync_notebooks.py           # rewrite the cells
    python scripts/sync_notebooks.py --check   # exit 1 if a notebook's cell differs

tests/test_notebooks.py checks that every notebook's first code cell equals
:func:`install_cell` and runs the cell's logic with and without ttamer_jax installed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")

# {repository} is replaced by the URL; everything else is the cell, verbatim.
TEMPLATE = '''\
# Colab or a fresh environment: install ttamer_jax from its repository (a no-op when installed).
try:
  import ttamer_jax
except ImportError:
  %pip install -q "ttamer-jax @ git+{repository}"'''


def repository_url(pyproject: str = os.path.join(REPO, "pyproject.toml")) -> str:
  """``[project.urls] Repository`` of pyproject.toml."""
  with open(pyproject, encoding="utf-8") as f:
    text = f.read()
  try:
    import tomllib
  except ImportError:  # Python 3.10: the one line this needs
    section = re.search(r"^\[project\.urls\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    match = section and re.search(r'^Repository\s*=\s*"([^"]+)"', section.group(1), re.M)
    if not match:
      raise ValueError(f"{pyproject}: no [project.urls] Repository") from None
    return match.group(1)
  urls = tomllib.loads(text).get("project", {}).get("urls", {})
  if "Repository" not in urls:
    raise ValueError(f"{pyproject}: no [project.urls] Repository")
  return urls["Repository"]


def install_cell(repository: str | None = None) -> str:
  """The install cell's source, for ``repository`` (default: pyproject.toml's)."""
  return TEMPLATE.format(repository=repository or repository_url())


def _first_code_cell(nb: dict) -> dict:
  return next(c for c in nb["cells"] if c["cell_type"] == "code")


def cell_source(cell: dict) -> str:
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def sync(paths=None, *, check: bool = False) -> list[str]:
  """Writes :func:`install_cell` into each notebook (``check``: only compares);
  returns the notebooks whose cell differed."""
  cell_text = install_cell()
  differ = []
  for path in sorted(paths or glob.glob(os.path.join(NOTEBOOKS, "*.ipynb"))):
    with open(path, encoding="utf-8") as f:
      nb = json.load(f)
    cell = _first_code_cell(nb)
    if cell_source(cell) == cell_text:
      continue
    differ.append(path)
    if not check:
      cell["source"] = cell_text.splitlines(keepends=True)
      with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
  return differ


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true", help="only report notebooks that differ")
  args = parser.parse_args(argv)
  differ = sync(check=args.check)
  for path in differ:
    print(("differs: " if args.check else "updated: ") + os.path.relpath(path, REPO))
  return 1 if args.check and differ else 0


if __name__ == "__main__":
  sys.exit(main())
