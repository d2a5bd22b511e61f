"""What serving costs: each stage's served seconds, a per-batch cost model, a batch's wall time.

A policy fitted on per-stage costs promises a saving; these functions measure what the
serving path (:class:`~ttamer_jax.Server`) actually spends, so that a policy can be
fitted on the served costs (``traces.replace(costs=cost_shares(served_stage_costs(...)))``,
``ttamer demo --costs served``) and its served wall time reported next to the full
network's (:func:`served_wall_time`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttamer_jax.core import validation
from ttamer_jax.core.heuristics import FixedExitPolicy
from ttamer_jax.data.discretise import DeployedPolicy
from ttamer_jax.networks import serving
from ttamer_jax.networks.nn import EarlyExitNet, StaticGraph
from ttamer_jax.networks.serving import DEFAULT_BUCKETS, Server
from ttamer_jax.networks.training import check_labels


def reached_buckets(buckets: tuple[int, ...], num: int) -> tuple[int, ...]:
  """The buckets serving ``num`` requests with a fixed-exit policy runs stages on.

  Every request of a chunk runs each stage up to the exit, so no stage compacts:
  each runs on the bucket of its chunk's size (full chunks: the largest, which
  also sets the chunk size and so stays)."""
  cap = buckets[-1]
  sizes = [cap] * (num // cap) + ([num % cap] if num % cap else [])
  return tuple(sorted({serving.bucket_of(buckets, m) for m in sizes} | {cap}))


def served_stage_costs(model: EarlyExitNet, deployed: DeployedPolicy, x: Any, *,
                       buckets: Sequence[int] = DEFAULT_BUCKETS, repeats: int = 9) -> np.ndarray:
  """``[n]`` seconds per request of each stage as the serving path runs it.

  Serves ``x`` with fixed-exit policies that stop after stage ``k`` (every request
  runs stages ``0..k``, through the same server, discretiser and score as
  ``deployed``) for ``k = 0..n-1``, timed in interleaved rounds (medians), and
  returns the differences of consecutive times divided by the batch size. The
  costs therefore include whatever serving adds per stage (dispatch, compaction,
  padding of a full chunk), so a
  policy fitted on them (``traces.replace(costs=cost_shares(c))``) predicts the
  saving serving delivers on batches like ``x``. A difference that noise makes
  negative is reported as 0: pass the costs through :func:`cost_shares` (which
  floors every stage above 0) before fitting on them.

  The servers are built with only the buckets these policies reach
  (:func:`reached_buckets`): the same kernels run, and fewer are compiled.
  """
  x = model.check_input(x)
  repeats = validation.check_positive_int("repeats", repeats)
  n = model.num_stages
  reached = reached_buckets(serving.check_buckets(buckets), x.shape[0])
  # Exit states (no answer model) read the signal the deployed policy's stages read.
  score = deployed.score_name if deployed.answers is None else deployed.answers.score_name
  servers = [Server(model, deployed.replace(
      policy=FixedExitPolicy(exit_stage=jnp.asarray(k, jnp.int32), num_stages=n), answers=None,
      score_name=score), buckets=reached) for k in range(n)]
  for server in servers:
    server(x)
  times = np.zeros((repeats, n))
  for r in range(repeats):
    for k, server in enumerate(servers):
      t0 = time.perf_counter()
      server(x)
      times[r, k] = time.perf_counter() - t0
  cumulative = np.median(times, axis=0)
  return np.maximum(np.diff(cumulative, prepend=0.0), 0.0) / x.shape[0]


@dataclasses.dataclass(frozen=True)
class ServedCostModel:
  """Seconds serving a batch spends on each stage: ``per_batch + per_request * count``.

  A stage served to fewer requests is not proportionally cheaper: fitted on two
  batch sizes, a stage's served time has a part that does not shrink with the batch
  (the digits CNN on 2 CPU cores: 1.6-2.5 ms at three of its four stages beside 7-28 us
  per request; whatever serving adds per call, such as a remainder padded to its
  bucket). Per-request costs
  measured on whole batches (:func:`served_stage_costs`) then under-price the later
  stages of a policy that stops most requests early; this model prices them at the
  number of requests that reach them (:meth:`seconds`, :meth:`per_request_costs`).

  Attributes:
    per_batch: ``[n]`` seconds stage ``k`` adds to a served batch that any request
      reaches it in, whatever their number.
    per_request: ``[n]`` seconds per request that reaches stage ``k``.
    batch_size: requests per served batch the two were measured at (the model
      describes batches of about this size).
  """

  per_batch: np.ndarray
  per_request: np.ndarray
  batch_size: int

  def _counts(self, reach: Any) -> np.ndarray:
    reach = validation.as_numpy("reach", reach, ndim=1).astype(np.float64)
    validation.check_shape("reach", reach, self.per_batch.shape)
    if not (np.all(reach >= 0) and np.all(reach <= 1)):
      raise ValueError(f"reach: fractions of requests must lie in [0, 1], got {reach.tolist()}")
    return reach * self.batch_size

  def seconds(self, reach: Any) -> float:
    """Modelled seconds to serve a batch of ``batch_size`` when a fraction ``reach[k]``
    (``[n]``) of its requests reaches stage ``k``."""
    counts = self._counts(reach)
    return float(np.sum(np.where(counts > 0, self.per_batch, 0.0) + self.per_request * counts))

  def per_request_costs(self, reach: Any) -> np.ndarray:
    """``[n]`` seconds per request of each stage when ``reach[k]`` of a batch reaches it:
    the per-batch part shared by those requests (by one request where none does)."""
    counts = self._counts(reach)
    return self.per_request + self.per_batch / np.maximum(counts, 1.0)


def served_cost_model(model: EarlyExitNet, deployed: DeployedPolicy, x: Any, *,
                      fraction: int = 4, buckets: Sequence[int] = DEFAULT_BUCKETS,
                      repeats: int = 9) -> ServedCostModel:
  """Each stage's served time split into a per-batch and a per-request part.

  Times every stage as :func:`served_stage_costs` does, on ``x`` and on its first
  ``len(x) // fraction`` requests, and fits per stage the line through the two
  per-batch times (each part floored at 0: a difference noise makes negative).

  Raises:
    ValueError: fewer than ``2 * fraction`` requests in ``x``, or ``fraction < 2``.
  """
  x = model.check_input(x)
  fraction = validation.check_positive_int("fraction", fraction)
  num = x.shape[0]
  if fraction < 2 or num < 2 * fraction:
    raise ValueError(f"fraction: need fraction >= 2 and at least 2 * fraction requests in x, "
                     f"got fraction={fraction} and {num} requests")
  small = num // fraction
  kw = dict(buckets=buckets, repeats=repeats)
  big_s = served_stage_costs(model, deployed, x, **kw) * num
  small_s = served_stage_costs(model, deployed, x[:small], **kw) * small
  per_request = np.maximum((big_s - small_s) / (num - small), 0.0)
  per_batch = np.maximum(big_s - per_request * num, 0.0)
  return ServedCostModel(per_batch=per_batch, per_request=per_request, batch_size=num)


# A stage's served cost is the difference of two noisy medians: on a loaded machine a
# cheap stage can come out 0 (a negative difference, clamped) or nearly so. Traces
# accept a zero cost, but a policy fitted on it treats the stage as free and runs it
# whatever it observes. A floor of 0.1% of the full cost keeps such a stage cheap,
# never free.
MIN_STAGE_SHARE = 1e-3


def cost_shares(costs: Any, *, floor: float = MIN_STAGE_SHARE) -> np.ndarray:
  """``[n]`` per-stage costs as shares of their sum, each floored at ``floor`` and
  renormalised: strictly positive, summing to 1 (the unit of measured trace costs).

  Raises:
    ValueError: ``costs`` not finite and ``>= 0``, or summing to 0 (every stage
      timed as free: noise swamped the stages; time more repeats or a larger batch);
      ``floor`` not in ``[0, 1 / n)``.
  """
  costs = validation.as_numpy("costs", costs, ndim=1).astype(np.float64)
  validation.check_nonnegative("costs", costs)
  total = float(costs.sum())
  if not costs.size or not np.isfinite(total) or total <= 0:
    raise ValueError(f"costs: every stage measured as free ({costs.tolist()}); timing noise "
                     "swamped the stages: time more repeats or a larger batch")
  if not 0 <= floor < 1.0 / costs.size:
    raise ValueError(f"floor: must be in [0, 1/{costs.size}), got {floor!r}")
  shares = np.maximum(costs / total, floor)
  return shares / shares.sum()


@functools.partial(jax.jit, static_argnames=("graph",))
def _last_exit(graph, state, x):
  """``[B]`` last-exit predictions of the whole network on ``x``, one jitted call."""
  return jnp.argmax(nnx.merge(graph.graphdef, state)(x).logits[:, -1], axis=-1)


def served_wall_time(model: EarlyExitNet, deployed: DeployedPolicy, x: Any, y: Any, *,
                     buckets: Sequence[int] = DEFAULT_BUCKETS, repeats: int = 5) -> dict:
  """Wall time and accuracy of serving ``x`` with ``deployed``, next to the full network's.

  Serving is timed through one :class:`~ttamer_jax.Server` (steady state: validation
  and the parameter snapshot done once, everything compiled first); the full network
  both as one jitted call on the whole batch and in the server's chunks
  (:meth:`Server.full_network`: on a CPU a batch of thousands can be slower in one call
  than in chunks of a few hundred), and the faster of the two is the reference. Calls
  are interleaved, so that machine load affects all alike; each time is a median.

  Args:
    model: the network.
    deployed: the policy served.
    x: ``[B, *input_shape]`` requests.
    y: ``[B]`` their labels.
    buckets: the server's bucket batch sizes.
    repeats: timed calls of each.

  Returns:
    A JSON-ready dict: ``serve_seconds``, ``full_seconds`` (the faster of
    ``full_one_call_seconds`` and ``full_chunked_seconds``), ``speedup``
    (``full_seconds / serve_seconds``), ``serve_accuracy``, ``full_accuracy`` (of the
    last exit), ``mean_stages`` (stages run per request), ``batch_size`` (``B``) and
    ``repeats``.
  """
  x = model.check_input(x)
  y = check_labels(model, y, x.shape[0])
  repeats = validation.check_positive_int("repeats", repeats)
  server = Server(model, deployed, buckets=buckets)
  graph, state = StaticGraph(nnx.graphdef(model)), nnx.state(model)
  x_dev = jnp.asarray(x)
  full_pred = np.asarray(_last_exit(graph, state, x_dev))
  server.full_network(x)
  served = server(x)
  one_t, chunk_t, serve_t = [], [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(_last_exit(graph, state, x_dev))
    one_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    server.full_network(x)
    chunk_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    server(x)
    serve_t.append(time.perf_counter() - t0)
  one, chunked, serve_s = (float(np.median(t)) for t in (one_t, chunk_t, serve_t))
  full = min(one, chunked)
  return dict(serve_seconds=serve_s, full_seconds=full,
              serve_accuracy=float((served.predictions == y).mean()),
              full_accuracy=float((full_pred == y).mean()),
              mean_stages=float(served.num_consulted.mean()), batch_size=int(x.shape[0]),
              repeats=repeats, full_one_call_seconds=one, full_chunked_seconds=chunked,
              speedup=full / serve_s)
