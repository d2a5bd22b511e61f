"""Layer 4, networks: Flax nnx early-exit networks (imports flax and optax).

Modules: :mod:`.nn` (the networks), :mod:`.training` (optax training,
checkpoints), :mod:`.profiling` (exit traces with measured costs),
:mod:`.serving` (policy-guided batched inference), :mod:`.serving_costs` (what
serving costs per stage, and a served batch's wall time), :mod:`.workloads` (built-in
data sets and their networks). Imports from ``core``, ``data`` and
``evaluation`` only. ``ttamer_jax.EarlyExitCNN`` etc. load this layer on first use.
"""

from ttamer_jax.networks import nn, profiling, serving, serving_costs, training, workloads
from ttamer_jax.networks.nn import EarlyExitCNN, EarlyExitMLP, EarlyExitNet, EarlyExitTransformer
from ttamer_jax.networks.profiling import collect_traces
from ttamer_jax.networks.serving import Server, ServeResult, serve
from ttamer_jax.networks.training import TrainConfig, load_checkpoint, save_checkpoint, train

__all__ = ["nn", "profiling", "serving", "serving_costs", "training", "workloads", "EarlyExitCNN", "EarlyExitMLP",
           "EarlyExitNet", "EarlyExitTransformer", "collect_traces", "ServeResult", "Server",
           "serve", "TrainConfig", "load_checkpoint", "save_checkpoint", "train"]
