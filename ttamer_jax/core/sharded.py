"""Parameter sweeps: many ``lam`` values x many cascades in one compiled call,
sharded over devices and hosts with ``jax.sharding`` (DESIGN.md section 9).

A sweep solves every pair ``(instance i, lam_j)``. The pairs form an ``[I, L]``
grid; one of its axes -- the *sweep axis* -- is split across the devices of a
:class:`jax.sharding.Mesh` (by default all devices JAX sees, across every host
after ``jax.distributed.initialize``), padded to a multiple of the device count.
Each device solves its block with nested ``vmap``s, in batches bounded by
:data:`MAX_BATCH_BYTES` (on CPUs: recall batches by :data:`MAX_TABLE_BYTES_CPU`,
others by :data:`MAX_BATCH_BYTES_CPU`) through ``jax.lax.map(..., batch_size=...)``,
so memory stays flat for any sweep length; there is no communication between devices.

Which axis is sharded (``shard="auto"``): the one whose padding wastes less work,
instances on a tie (then each device holds only its own instances' transition
matrices; sharding ``lam`` replicates the cascades on every device).

Multi-host (one process per host, every process running the same program with
the same arguments, as JAX's multi-controller model requires)::

    jax.distributed.initialize()            # or coordinator_address=..., etc.
    result = ttamer_jax.sweep(cascades, lams)   # mesh over all global devices
    values = jax.experimental.multihost_utils.process_allgather(result.value, tiled=True)

``scripts/multihost_sweep.py`` is a runnable example.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ttamer_jax.core import kernel, validation
from ttamer_jax.core.kernel import DEFAULT_PRECISION
from ttamer_jax.core.model import Cascade
from ttamer_jax.core.shapes import bucket_size
from ttamer_jax.core.solvers import solve_no_recall_compiled, solve_recall_lams
from ttamer_jax.core.struct import pytree_dataclass

# Per-device memory one batch of pairs may use for the solver's working tables
# (about ``4 M K`` floats per recall solve). Larger batches only amortise
# dispatch, which is negligible once a batch is this big.
MAX_BATCH_BYTES = 1 << 30
# On CPUs a recall batch is sized by its value table ([M, K] per pair) instead:
# tables of <= 128 KiB stay in a core's cache, and the elementwise passes of a
# larger batch ran 3-10x slower per entry on a 2-core EPYC (K = 8, 16, 32: chunks
# of 512, 128, 32 lams vs twice that). Above kernel.SMALL_K the per-stage product
# needs rows more than cache: K = 64 .. 256 ran at 150-320 GFLOP/s in chunks of 8
# lams vs 130-180 in chunks of 1-2 (BENCHMARKS.md).
MAX_TABLE_BYTES_CPU = 1 << 17
MIN_PRODUCT_LAMS_CPU = 8
MAX_PRODUCT_BYTES_CPU = 1 << 23
MAX_BATCH_BYTES_CPU = 1 << 20

_SOLVERS = ("recall", "no_recall")
_SHARD = ("auto", "instances", "lams")


@pytree_dataclass
class SweepSolutions:
  """Solutions of every ``(instance, lam)`` pair of a sweep.

  Leading axes: ``[I, L]`` for a batch of ``I`` cascades, ``[L]`` for one
  cascade. When no padding was needed the arrays stay sharded over the mesh
  along the sweep axis; otherwise the padding is cut off and the arrays are
  gathered (replicated).

  Attributes:
    value: ``[I, L]`` optimal objective of each pair.
    index: ``[I, L, n, K]`` dynamic index (``solver="recall"`` with
      ``return_tables``), else ``None``.
    stop: ``[I, L, n, K]`` bool stop table (``solver="no_recall"`` with
      ``return_tables``), else ``None``.
  """

  value: chex.Array
  index: chex.Array | None = None
  stop: chex.Array | None = None


# ------------------------------------------------------------ validation
def _stack_cascades(cascades: Sequence[Cascade]) -> Cascade:
  if not cascades:
    raise ValueError("cascades: empty sequence (need at least one Cascade)")
  for i, c in enumerate(cascades):
    if not isinstance(c, Cascade):
      raise ValueError(f"cascades[{i}]: expected a ttamer_jax.Cascade, got {type(c).__name__}")
    if c.values.shape != cascades[0].values.shape:
      raise ValueError(
          f"cascades[{i}]: values has shape {tuple(c.values.shape)}, but cascades[0] has "
          f"{tuple(cascades[0].values.shape)} (a sweep needs equally shaped cascades)")
  leaves = [np.stack([np.asarray(getattr(c, f)) for c in cascades])
            for f in ("values", "init", "trans", "costs")]
  return jax.tree.unflatten(jax.tree.structure(cascades[0]), leaves)


def _batched_arrays(cascades) -> tuple[list[np.ndarray], bool]:
  """Validated ``[values [I,n,K], init [I,K], trans [I,n-1,K,K], costs [I,n]]``."""
  constructed = isinstance(cascades, (list, tuple))  # each passed its constructor's checks
  if constructed:
    cascades = _stack_cascades(cascades)
  if not isinstance(cascades, Cascade):
    raise ValueError(
        f"cascades: expected a Cascade (one, or a batch with a leading instance axis) or a "
        f"sequence of Cascades, got {type(cascades).__name__}")
  leaves = (cascades.values, cascades.init, cascades.trans, cascades.costs)
  if not all(validation.is_concrete(x) for x in leaves):
    raise ValueError("cascades: sweep runs at the boundary on concrete arrays; inside jit, "
                     "vmap ttamer_jax.solve_recall instead")
  values = validation.as_numpy("values", cascades.values)
  single = values.ndim == 2
  if values.ndim not in (2, 3):
    raise ValueError(f"values: expected shape [n, K] or [I, n, K], got {values.shape}")
  if single:
    leaves = [np.asarray(x)[None] for x in leaves]
  values, init, trans, costs = (validation.as_numpy(name, x) for name, x in
                                zip(("values", "init", "trans", "costs"), leaves))
  num, n, k = values.shape
  if num < 1 or n < 1 or k < 1:
    raise ValueError(f"values: every axis must be non-empty, got shape {values.shape}")
  if single or constructed:
    # One Cascade (or a list of them) passed its constructor's checks: validated once.
    return [values, init, trans, costs], single
  # A batch built inside a transformation (e.g. jax.vmap(random_cascade)) skipped the
  # constructor's checks: this is its boundary.
  validation.check_shape("init", init, (num, k))
  validation.check_shape("trans", trans, (num, n - 1, k, k))
  validation.check_shape("costs", costs, (num, n))
  validation.check_nonnegative("values", values)
  validation.check_nonnegative("costs", costs)
  validation.check_stochastic("init", init)
  validation.check_stochastic("trans", trans)
  return [values, init, trans, costs], single


def _validated_lams(lams: Any, num: int, dtype) -> np.ndarray:
  """``[I, L]`` lam grid from ``[L]`` (shared) or ``[I, L]`` (per instance)."""
  arr = validation.as_numpy("lams", lams)
  if arr.ndim == 1:
    arr = np.broadcast_to(arr, (num, arr.shape[0]))
  elif arr.ndim != 2 or arr.shape[0] != num:
    raise ValueError(f"lams: expected shape [L] or [{num}, L] (one row per instance), "
                     f"got {arr.shape}")
  if arr.shape[1] < 1:
    raise ValueError("lams: no lam values (L = 0)")
  validation.check_lam(arr)
  return np.asarray(arr, dtype)


# ------------------------------------------------------------- sharding
def default_mesh() -> Mesh:
  """A one-axis mesh ``("sweep",)`` over every device JAX sees (all hosts)."""
  return Mesh(np.asarray(jax.devices()), ("sweep",))


def auto_mesh(mesh: Mesh) -> Mesh:
  # Trimming padding slices a sharded axis unevenly, which explicit-sharding
  # meshes (jax.make_mesh's default) reject; automatic axes let XLA gather.
  auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
  if getattr(mesh, "axis_types", auto) == auto:
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def choose_axis(shard: str, num: int, num_lams: int, devices: int) -> str:
  if shard != "auto":
    return shard
  padded = lambda x: -(-x // devices) * devices
  return "instances" if padded(num) * num_lams <= num * padded(num_lams) else "lams"


def _global(arrays: list[np.ndarray], shardings: list[NamedSharding]) -> list:
  if jax.process_count() == 1:
    if all(len(sh.mesh.devices.flat) == 1 for sh in shardings):
      return arrays  # one device: the compiled call transfers them itself, with less overhead
    return jax.device_put(arrays, shardings)  # one batched transfer
  # Several hosts: every process holds the same host arrays and contributes the
  # shards on its own devices.
  return [jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx])
          for x, sh in zip(arrays, shardings)]


def _pad(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return np.pad(x, widths, mode="edge")  # repeat the last entry: valid inputs.


# --------------------------------------------------------------- compute
def _pair_bytes(solver: str, m: int, n: int, k: int, itemsize: int) -> int:
  if solver == "recall":
    return (4 * m * k + n * k) * itemsize
  return (3 * k + n * k) * itemsize


def _default_pairs(solver: str, m: int, n: int, k: int, itemsize: int, platform: str) -> int:
  """Pairs solved at once per device when ``batch_size`` is not given."""
  if platform == "cpu" and solver == "recall":   # sized by the value table (see above)
    table = m * k * itemsize
    pairs = MAX_TABLE_BYTES_CPU // table
    if k > kernel.SMALL_K:
      pairs = max(pairs, min(MIN_PRODUCT_LAMS_CPU, MAX_PRODUCT_BYTES_CPU // table))
    return max(1, pairs)
  budget = MAX_BATCH_BYTES_CPU if platform == "cpu" else MAX_BATCH_BYTES
  return max(1, budget // _pair_bytes(solver, m, n, k, itemsize))


def _batch_sizes(pairs: int, inst_block: int, lam_block: int) -> tuple[int, int]:
  """Instances x lams solved at once per device (a ``lax.map`` step), ``pairs`` in all."""
  lam_batch = min(lam_block, pairs)
  inst_batch = min(inst_block, max(1, pairs // lam_batch))
  return inst_batch, lam_batch


def _map(f, xs, batch: int, length: int):
  # One element at a time without vmap: a size-1 batch axis in front of the lam-minor
  # small-K tables made XLA:CPU's passes ~3x slower (K = 32).
  if batch == 1:
    if length == 1:
      return jax.tree.map(lambda a: a[None], f(jax.tree.map(lambda a: a[0], xs)))
    return jax.lax.map(f, xs)
  if batch >= length:
    return jax.vmap(f)(xs)
  return jax.lax.map(f, xs, batch_size=batch)


def _chunked(f, xs: jax.Array, chunk: int):
  """``f`` (which takes a ``[C]`` chunk) over ``xs [L]`` in chunks of ``chunk``, in turn."""
  length = xs.shape[0]
  if chunk >= length:
    return f(xs)
  full = length // chunk * chunk
  head = jax.lax.map(f, xs[:full].reshape(-1, chunk))
  head = jax.tree.map(lambda a: a.reshape((full,) + a.shape[2:]), head)
  if full == length:
    return head
  tail = f(xs[full:])
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head, tail)


@functools.lru_cache(maxsize=64)
def compiled_sweep(mesh: Mesh, axis: str, solver: str, inst_batch: int, lam_batch: int,
                    inst_block: int, lam_block: int, return_tables: bool, precision):
  names = tuple(mesh.axis_names)
  if axis == "instances":
    inst, lam_spec = PartitionSpec(names), PartitionSpec(names, None)
  else:
    inst, lam_spec = PartitionSpec(), PartitionSpec(None, names)
  table_spec = PartitionSpec(*lam_spec, None, None)

  def one_instance(args):
    cascade, grid, pos, lam_row = args

    if solver == "recall":
      # A chunk of lams is one solve with the batch folded into the matrix products.
      def lam_chunk(lams):
        sol = solve_recall_lams(cascade, lams, grid, pos, precision, return_tables)
        return sol.value, sol.index
      return _chunked(lam_chunk, lam_row, lam_batch)

    def one_pair(lam):
      sol = solve_no_recall_compiled(cascade, lam, precision)
      return sol.value, sol.stop

    value, table = _map(one_pair, lam_row, lam_batch, lam_block)
    return (value, table) if return_tables else (value, None)

  def local(values, init, trans, costs, grid, pos, lam_grid):
    cascade = jax.tree.unflatten(_CASCADE_TREEDEF, [values, init, trans, costs])
    return _map(one_instance, (cascade, grid, pos, lam_grid), inst_batch, inst_block)

  out_specs = (lam_spec, table_spec if return_tables else None)
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(inst,) * 6 + (lam_spec,),
                          out_specs=out_specs)
  # The lam grid is our own temporary of the value output's shape, dtype and
  # sharding: donating it lets XLA write the values in place.
  return jax.jit(sharded, donate_argnums=(6,))


def _cascade_treedef():
  # A structure-only probe: unflattening skips Cascade's validating __init__.
  probe = object.__new__(Cascade)
  for f in ("values", "init", "trans", "costs"):
    object.__setattr__(probe, f, 0)
  return jax.tree.structure(probe)


_CASCADE_TREEDEF = _cascade_treedef()


def sweep(cascades, lams, *, solver: str = "recall", mesh: Mesh | None = None,
          shard: str = "auto", return_tables: bool = True, batch_size: int | None = None,
          precision=DEFAULT_PRECISION) -> SweepSolutions:
  """Solves every ``(cascade, lam)`` pair in one compiled, sharded call.

  Args:
    cascades: one :class:`Cascade` (``values [n, K]``), a batch of equally shaped
      cascades as one ``Cascade`` with a leading instance axis (``values
      [I, n, K]``, e.g. ``jax.vmap(random_cascade)(keys)`` or
      ``jax.tree.map(lambda *a: np.stack(a), *cascades)``), or a sequence of
      ``Cascade``s. Validated here as the constructor would.
    lams: ``[L]`` trade-off weights in ``[0, 1]`` shared by all instances, or
      ``[I, L]`` one row per instance.
    solver: ``"recall"`` (:func:`~ttamer_jax.solve_recall`) or ``"no_recall"``.
    mesh: devices to shard over; every mesh axis is used for the sweep axis.
      Default: :func:`default_mesh` (all devices, all hosts).
    shard: ``"auto"``, ``"instances"`` or ``"lams"``: which axis of the pair grid
      is split across devices (see the module docstring).
    return_tables: also return the ``[n, K]`` policy table of every pair.
    batch_size: pairs solved at once per device; default from
      :data:`MAX_BATCH_BYTES` (CPUs: :data:`MAX_TABLE_BYTES_CPU` for recall,
      :data:`MAX_BATCH_BYTES_CPU` otherwise). Only the
      shapes of the matrix products depend on it (results agree to rounding).
    precision: matmul precision.

  Returns:
    :class:`SweepSolutions` with leading axes ``[I, L]`` (``[L]`` for one cascade).
  """
  if solver not in _SOLVERS:
    raise ValueError(f"solver: expected one of {_SOLVERS}, got {solver!r}")
  if shard not in _SHARD:
    raise ValueError(f"shard: expected one of {_SHARD}, got {shard!r}")
  if batch_size is not None:
    batch_size = validation.check_positive_int("batch_size", batch_size)
  if mesh is None:
    mesh = default_mesh()
  elif not isinstance(mesh, Mesh):
    raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
  mesh = auto_mesh(mesh)
  arrays, single = _batched_arrays(cascades)
  values, init, trans, costs = arrays
  dtype = np.dtype(jax.dtypes.canonicalize_dtype(values.dtype))
  lam_grid = _validated_lams(lams, values.shape[0], dtype)
  grid, pos = kernel.pad_grids(values)
  num, n, k = values.shape
  num_lams = lam_grid.shape[1]

  devices = mesh.size
  axis = choose_axis(shard, num, num_lams, devices)
  # Padded to a few bucket sizes (edge copies, cut off again): a new number of
  # instances or lams rarely compiles anew.
  per_device = lambda size, split: (bucket_size(-(-size // devices), minimum=1) * devices
                                    if split else bucket_size(size, minimum=1))
  num_pad = per_device(num, axis == "instances")
  lams_pad = per_device(num_lams, axis == "lams")
  inst_block = num_pad // devices if axis == "instances" else num_pad
  lam_block = lams_pad // devices if axis == "lams" else lams_pad
  pairs = batch_size if batch_size is not None else _default_pairs(
      solver, grid.shape[1], n, k, dtype.itemsize, mesh.devices.flat[0].platform)
  inst_batch, lam_batch = _batch_sizes(pairs, inst_block, lam_block)
  if solver == "recall" and lam_batch < lam_block:
    # Equal chunks (the lams padded by fewer than one per chunk): one compiled chunk
    # body instead of a body and a tail.
    chunks = -(-lam_block // lam_batch)
    lam_batch = -(-lam_block // chunks)
    lam_block = chunks * lam_batch
    lams_pad = lam_block * devices if axis == "lams" else lam_block

  names = tuple(mesh.axis_names)
  inst_sharding = NamedSharding(mesh, PartitionSpec(names) if axis == "instances" else PartitionSpec())
  lam_sharding = NamedSharding(
      mesh, PartitionSpec(names, None) if axis == "instances" else PartitionSpec(None, names))
  host = [np.asarray(_pad(x, 0, num_pad), dt)
          for x, dt in ((values, dtype), (init, dtype), (trans, dtype), (costs, dtype),
                        (grid, dtype), (pos, np.int32))]
  # A fresh buffer: it is donated, and CPU transfers may alias host memory.
  host.append(np.array(_pad(_pad(lam_grid, 0, num_pad), 1, lams_pad), dtype, copy=True))
  inputs = _global(host, [inst_sharding] * 6 + [lam_sharding])
  fn = compiled_sweep(mesh, axis, solver, inst_batch, lam_batch, inst_block, lam_block,
                       bool(return_tables), precision)
  value, table = fn(*inputs)
  if num_pad != num or lams_pad != num_lams:
    value, table = _trim(value, table, num, num_lams)
  if single:
    value, table = _squeeze(value, table)
  tables = dict(index=table) if solver == "recall" else dict(stop=table)
  return SweepSolutions(value=value, **tables)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _trim(value, table, num, num_lams):
  return value[:num, :num_lams], None if table is None else table[:num, :num_lams]


# Donated: the sweep's outputs are temporaries, so dropping the instance axis of one
# cascade is a view, not a copy of the [L, n, K] tables (~10% of a K = 8 sweep).
@functools.partial(jax.jit, donate_argnums=(0, 1))
def _squeeze(value, table):
  return value[0], None if table is None else table[0]
