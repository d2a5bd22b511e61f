"""Layer 3, evaluation: what a policy is worth.

Held-out replay metrics with bootstrap intervals (:mod:`.metrics`), exact metrics
on a model and robustness (:mod:`.exact`), frontiers and policy-family sweeps
(:mod:`.frontier`), SLO-constrained policies (:mod:`.slo`) and drift
(:mod:`.drift`). Imports only from ``core`` and ``data``. Public names are
exported by :mod:`ttamer_jax`.
"""
