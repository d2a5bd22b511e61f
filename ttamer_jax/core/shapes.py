"""Batch sizes rounded to a few buckets, so that compiled functions are reused.

XLA compiles a function once per input shape. Entry points whose batch size varies
from call to call (requests replayed, ``lam`` grids swept) pad the batch to
:func:`bucket_size` and cut the outputs back: a new size then rarely compiles anew,
for at most ``1 / per_octave`` extra work.
"""

from __future__ import annotations

import numpy as np


def bucket_size(num: int, per_octave: int = 8, minimum: int = 64) -> int:
  """The smallest bucket ``>= num``: every size up to ``max(minimum, per_octave)``, then
  ``per_octave`` evenly spaced sizes per doubling (at most ``1/per_octave`` extra rows)."""
  num = int(num)
  if num <= minimum:
    return minimum
  step = 1 << max(0, int(np.floor(np.log2(num))) - int(np.log2(per_octave)))
  return -(-num // step) * step
