"""Measures how far float32 solves drift from float64 solves of the same cascade.

Prints the largest ratio |J_float32 - J_float64| / (n eps32 (max loss + sum costs))
over random cascades with losses and costs spanning 1e-8..1e8, concentrated
(near-deterministic) rows and lam in {0, 1, random}, for the recall, no-recall and
hindsight solvers. docs/formulation.md ("Precision") states the bound the tests
enforce (ratio <= 4); this script shows the margin.

    python benchmarks/float32_precision.py --cascades 300
"""

import argparse

import jax
import numpy as np

import ttamer_jax as tj


def solve_three(cascade, lam):
  return (float(tj.solve_recall(cascade, lam).value), float(tj.solve_no_recall(cascade, lam).value),
          float(tj.prophet_value(cascade, lam)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cascades", type=int, default=300, help="random cascades (300)")
  args = parser.parse_args()
  eps = float(np.finfo(np.float32).eps)
  worst, cases = 0.0, 0
  for seed in range(args.cascades):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 7)), int(rng.integers(1, 9))
    values = rng.uniform(0, 1, (n, k)) * 10.0 ** rng.integers(-8, 9)
    costs = 10.0 ** rng.uniform(-8, 8, n) if seed % 2 else rng.uniform(0, 1, n)
    conc = 0.05 if seed % 3 == 0 else 1.0
    init = rng.dirichlet(np.full(k, conc))
    trans = rng.dirichlet(np.full(k, conc), size=(n - 1, k)).reshape(n - 1, k, k)
    lam = (0.0, 1.0, float(rng.uniform()))[seed % 3]
    with jax.enable_x64(True):
      exact = solve_three(tj.Cascade(values, init, trans, costs), lam)
    approx = solve_three(tj.Cascade(values, init, trans, costs), lam)
    scale = n * eps * (values.max() + costs.sum())
    for a, b in zip(approx, exact):
      assert np.isfinite(a), "NaN/inf from valid input"
      worst = max(worst, abs(a - b) / scale)
      cases += 1
  print(f"{cases} solves; max |J32 - J64| / (n eps32 (max loss + sum costs)) = {worst:.3f} "
        "(tested bound: 4)")


if __name__ == "__main__":
  main()
