"""Layer 1, core: pure numerics (jax, numpy, chex).

The model (:mod:`.model`, :mod:`.graph`, :mod:`.factored`), the one recall kernel
(:mod:`.kernel`) and the solvers that supply its continuation (:mod:`.solvers`,
:mod:`.factored`, :mod:`.graph`, :mod:`.relaxation`, :mod:`.sharded`), policies and
their protocol (:mod:`.protocol`, :mod:`.policies`, :mod:`.heuristics`), replay and
Monte-Carlo (:mod:`.replay`). Imports nothing from the layers above. Public names
are exported by :mod:`ttamer_jax`.
"""
