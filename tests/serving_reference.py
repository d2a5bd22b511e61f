"""An unbatched reference of :func:`ttamer_jax.serve`, for tests: each request alone, eagerly.

It follows the serving protocol (signal -> ``deployed.observe`` -> recall bookkeeping ->
``policy.step``) with batch size 1, no compaction, padding or jit, so a batched server
that answers like it has compacted, padded and grouped correctly. Slow by design.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np

from ttamer_jax.data.discretise import DeployedPolicy
from ttamer_jax.networks import serving
from ttamer_jax.networks.nn import EarlyExitNet


def serve_reference(model: EarlyExitNet, deployed: DeployedPolicy, x: Any) -> serving.ServeResult:
  """Unbatched reference of :func:`serve`: each request alone, stage by stage, eagerly.

  It follows the same protocol (signal -> ``deployed.observe`` -> recall bookkeeping
  -> ``policy.step``) with batch size 1, no compaction, padding or jit, and is
  meant for tests (it is slow).
  """
  x = model.check_input(x)
  serving.check_deployed(model, deployed)
  policy, n = deployed.policy, model.num_stages
  num = x.shape[0]
  out = serving.ServeResult.empty(num, n)
  for r in range(num):
    h = jnp.asarray(x[r:r + 1])
    carry = policy.initial_carry(1)
    best = jnp.full((1,), jnp.inf, jnp.float32)
    best_stage, best_pred, prev_pred, top_score, top_pred = 0, 0, 0, -np.inf, 0
    evidence = serving._initial_evidence(deployed, 1, n)
    for stage in range(n):
      h, logits, err = model.stage(stage, h)
      score, pred_arr = serving._exit_observation(deployed, stage, logits, err)
      answered = stage
      if deployed.answers is not None:
        evidence, score, pred_arr, answered_arr = serving._virtual_stage(
            deployed, stage, evidence, score, pred_arr)
        answered = int(np.asarray(answered_arr)[0])
      pred = int(np.asarray(pred_arr)[0])
      obs = deployed.observe(stage, score, jnp.asarray([pred], jnp.int32),
                             jnp.asarray([prev_pred], jnp.int32),
                             jnp.asarray([top_pred], jnp.int32))
      if float(np.asarray(score)[0]) > top_score:
        top_score, top_pred = float(np.asarray(score)[0]), pred
      if policy.recall:
        est = policy.estimate(stage, obs)
        if stage == 0 or bool(np.asarray(est)[0] < np.asarray(best)[0]):
          best, best_stage, best_pred = est, answered, pred
      carry, stop = policy.step(carry, stage, obs, best)
      out.consulted[r, stage] = True
      out.states[r, stage] = int(np.asarray(obs.state)[0])
      if bool(np.asarray(stop)[0]) or stage == n - 1:
        out.stop_stage[r] = stage
        out.answered_exit[r] = best_stage if policy.recall else answered
        out.predictions[r] = best_pred if policy.recall else pred
        break
      prev_pred = pred
  return out
