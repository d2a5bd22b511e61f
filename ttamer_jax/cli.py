"""The ``ttamer`` command line."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


class _Parser(argparse.ArgumentParser):
  """Bad arguments: one line on stderr and exit code 2, no traceback."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def _demo(args) -> dict:
  import jax

  import ttamer_jax as tj

  cascade = tj.model.demo_cascade()
  lams = [float(x) for x in np.linspace(0.1, 0.9, 5)]
  rows = []
  for lam in lams:
    recall = float(tj.solve_recall(cascade, lam).value)
    no_recall = float(tj.solve_no_recall(cascade, lam).value)
    prophet = float(tj.prophet_value(cascade, lam))
    mc = tj.monte_carlo(jax.random.PRNGKey(0), cascade, tj.recall_policy(cascade, lam), lam,
                        args.paths)
    rows.append(dict(lam=lam, prophet=prophet, recall=recall, no_recall=no_recall,
                     recall_monte_carlo=float(mc.objective), monte_carlo_se=float(mc.objective_se),
                     no_recall_over_recall=no_recall / recall))
  gap = []
  for alpha in (2.0, 10.0):
    g = tj.gap_instance(alpha)
    gap.append(dict(alpha=alpha, recall=float(tj.solve_recall(g, 1.0).value),
                    prophet=float(tj.prophet_value(g, 1.0)),
                    no_recall=float(tj.solve_no_recall(g, 1.0).value)))
  return dict(cascade=dict(stages=cascade.num_stages, states=cascade.num_states), sweep=rows, gap=gap)


def _print_demo(result: dict) -> None:
  c = result["cascade"]
  print(f"Built-in synthetic cascade: {c['stages']} stages, {c['states']} states per stage "
        "(objective = lam * loss + (1 - lam) * cost; lower is better)\n")
  header = f"{'lam':>5} {'hindsight':>10} {'recall':>10} {'no-recall':>10} {'recall MC (+-se)':>22} {'no-recall/recall':>17}"
  print(header)
  print("-" * len(header))
  for r in result["sweep"]:
    mc = f"{r['recall_monte_carlo']:.5f} +- {r['monte_carlo_se']:.5f}"
    print(f"{r['lam']:5.2f} {r['prophet']:10.5f} {r['recall']:10.5f} {r['no_recall']:10.5f} {mc:>22} "
          f"{r['no_recall_over_recall']:17.3f}")
  print("\nGap instance (DESIGN.md section 1, lam = 1): no recall loses a factor alpha")
  print(f"{'alpha':>6} {'hindsight':>10} {'recall':>10} {'no-recall':>10} {'ratio':>7}")
  for g in result["gap"]:
    print(f"{g['alpha']:6.1f} {g['prophet']:10.6f} {g['recall']:10.6f} {g['no_recall']:10.6f} "
          f"{g['no_recall'] / g['recall']:7.2f}")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="ttamer", description="Optimal exit and routing policies for cascaded and "
                   "early-exit ML serving.")
  sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
  demo = sub.add_parser("demo", help="solve and compare recall / no-recall / hindsight on a built-in cascade")
  demo.add_argument("--paths", type=int, default=200_000, help="Monte-Carlo paths per lam (default 200000)")
  demo.add_argument("--json", action="store_true", help="print machine-readable JSON")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.command == "demo":
      if args.paths < 1:
        raise ValueError(f"--paths = {args.paths} must be >= 1")
      result = _demo(args)
      if args.json:
        print(json.dumps(result, indent=2))
      else:
        _print_demo(result)
  except ValueError as e:
    print(f"ttamer {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
