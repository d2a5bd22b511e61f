"""The code in README.md and docs/*.md runs, so the documentation cannot rot.

* Every ```python block runs: the blocks of one file in order, in one namespace, in a
  temporary working directory (the docs use small sizes). A block may be left out only
  with a visible reason on the line before it::

      <!-- docs-test: skip (why this block is not run) -->

  and is then still compiled (no syntax errors, nothing stale to import by name).
* Every ``ttamer ...`` command in a ```bash / ```sh block (also after ``&&``, as
  ``.venv/bin/ttamer``) is parsed by the real argument parser: the documented commands,
  flags and values exist and are accepted. Nothing is executed.
* Every option named in a command synopsis (an unlabelled block whose lines start with
  ``ttamer COMMAND``, as in docs/cli.md) is an option of that command, and docs/cli.md
  has a synopsis of every command.
"""

import argparse
import dataclasses
import glob
import os
import re
import shlex

import pytest
from test_bench import import_benchmark

import ttamer_jax as tj
from ttamer_jax.app import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
SKIP = re.compile(r"^<!-- docs-test: skip \((?P<reason>[^()]*\w[^()]*)\) -->$")
PYTHON, SHELL = ("python", "py"), ("bash", "sh", "shell")


@dataclasses.dataclass(frozen=True)
class Block:
  path: str
  line: int           # 1-based line of the opening fence
  lang: str
  source: str
  skip: str | None    # the reason, if the block is marked to be skipped

  @property
  def where(self) -> str:
    return f"{os.path.relpath(self.path, REPO)}:{self.line}"


def blocks(path):
  """The fenced code blocks of a Markdown file, in order."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  out, i = [], 0
  while i < len(lines):
    m = re.match(r"^```\s*([\w+-]*)\s*$", lines[i])
    if not m:
      i += 1
      continue
    end = i + 1
    while end < len(lines) and not lines[end].startswith("```"):
      end += 1
    assert end < len(lines), f"{path}:{i + 1}: unclosed code block"
    prev = lines[i - 1].strip() if i else ""
    skip = SKIP.match(prev)
    if prev.startswith("<!-- docs-test") and not skip:
      raise AssertionError(f"{path}:{i}: malformed marker {prev!r}; write "
                           "'<!-- docs-test: skip (reason) -->'")
    out.append(Block(path, i + 1, m.group(1).lower(), "\n".join(lines[i + 1:end]) + "\n",
                     skip.group("reason") if skip else None))
    i = end + 1
  return out


ALL = {os.path.relpath(p, REPO): blocks(p) for p in DOCS}
WITH_PYTHON = [name for name, bs in ALL.items() if any(b.lang in PYTHON for b in bs)]
WITH_SHELL = [name for name, bs in ALL.items() if any(b.lang in SHELL for b in bs)]
WITH_SYNOPSES = [name for name, bs in ALL.items() if any(b.lang == "" for b in bs)]


def test_the_docs_have_code_and_markers_sit_on_code_blocks():
  assert "README.md" in WITH_PYTHON and "README.md" in WITH_SHELL
  for path in DOCS:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    for i, line in enumerate(lines):
      if line.strip().startswith("<!-- docs-test"):
        assert i + 1 < len(lines) and lines[i + 1].startswith("```"), (
            f"{path}:{i + 1}: a docs-test marker must be on the line before a code block")


# Training steps a documented `tj.train` call runs here (as `ttamer demo --quick`, a tenth of
# the digits MLP's 1,500): the docs' code runs unchanged at a small size, as the notebooks do.
DOCS_TRAIN_STEPS = 150


@pytest.mark.parametrize("name", WITH_PYTHON)
def test_python_blocks_run(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  train = tj.train

  def small_train(model, x, y, config=None, **kw):
    config = tj.networks.TrainConfig() if config is None else config
    small = dataclasses.replace(config, num_steps=min(config.num_steps, DOCS_TRAIN_STEPS),
                                warmup_steps=min(config.warmup_steps, 10))
    return train(model, x, y, small, **kw)

  monkeypatch.setattr(tj, "train", small_train)
  namespace = {"__name__": "__docs__"}
  for block in ALL[name]:
    if block.lang not in PYTHON:
      continue
    code = compile(block.source, block.where, "exec")  # tracebacks name the file and line
    if block.skip is None:
      exec(code, namespace)  # noqa: S102 -- the documentation's own code


# ------------------------------------------------------------------ commands
PARSER = cli.build_parser()
# `ttamer bench ARGS` hands ARGS to the checkout's harness, whose parser owns the flags.
BENCH_PARSER = import_benchmark("bench").build_parser("ttamer", prog="ttamer bench")


def _subparsers(parser) -> dict[str, argparse.ArgumentParser]:
  (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  return dict(action.choices, bench=BENCH_PARSER)


def _parse(args: list[str]) -> None:
  """Parses a ``ttamer`` command line as the program does (SystemExit if it is bad)."""
  if args[:1] == ["bench"]:
    BENCH_PARSER.parse_args(args[1:])
  else:
    PARSER.parse_args(args)


def _ttamer_commands(block):
  """The argument lists of every ``ttamer`` invocation in a shell block."""
  for line in block.source.splitlines():
    tokens = shlex.split(line, comments=True)
    start = 0
    for j in range(len(tokens) + 1):
      if j == len(tokens) or tokens[j] in ("&&", "||", ";", "|"):
        if j > start + 1 and tokens[start] == "time":  # `time ttamer demo ...`
          start += 1
        if j > start and os.path.basename(tokens[start]) == "ttamer":
          yield line, tokens[start + 1:j]
        start = j + 1


@pytest.mark.parametrize("name", WITH_SHELL)
def test_documented_commands_parse(name):
  count = 0
  for block in ALL[name]:
    if block.lang not in SHELL:
      continue
    for line, args in _ttamer_commands(block):
      try:
        _parse(args)
      except SystemExit as e:  # argparse reports a bad command line by exiting
        raise AssertionError(f"{block.where}: `{line.strip()}` does not parse (exit {e.code})") from e
      count += 1
  if name == "README.md":
    assert count >= 5  # the demo and the commands on its files


@pytest.mark.parametrize("name", WITH_SYNOPSES)
def test_synopsis_options_exist(name):
  commands = _subparsers(PARSER)
  seen = set()
  for block in ALL[name]:
    if block.lang != "":
      continue
    command = None
    for line in block.source.splitlines():
      words = line.split()
      if line.startswith("ttamer ") and len(words) > 1:
        command = words[1]
        assert command in commands, f"{block.where}: unknown command `ttamer {command}`"
        seen.add(command)
      elif not line.startswith(" "):
        command = None  # a synopsis continues on indented lines only
      if command is None:
        continue
      known = commands[command]._option_string_actions
      for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", line):
        assert option in known, f"{block.where}: `ttamer {command}` has no option {option}"
  if name == "docs/cli.md":
    assert seen == set(commands)  # every command has its synopsis


def test_demo_timings_agree_everywhere():
  """README.md, docs/cli.md and `ttamer demo --help` quote the one measured timing
  (demo.DEMO_TIMING, with the machine), not figures of their own."""
  from ttamer_jax.app import demo

  phrase = " ".join(demo.demo_timing_text().split())
  assert "measured on" in phrase and all(demo.DEMO_TIMING[k] > 0
                                         for k in ("first_s", "cached_s", "train_s"))
  for path in ("README.md", "docs/cli.md"):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
      text = " ".join(f.read().split())
    assert phrase in text, path
    assert not re.search(r"(about|~) ?\d+ s (of training|on 2 CPU|the first time)", text), path
  help_text = " ".join(_subparsers(PARSER)["demo"].format_help().split())
  assert phrase in help_text
