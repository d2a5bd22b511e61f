"""Frozen dataclasses registered as JAX pytrees.

Array fields are pytree leaves; fields listed in ``static`` are hashable metadata
(part of the tree structure, so a change recompiles). Unflattening bypasses
``__init__``, so boundary validation in ``__post_init__`` runs only when a user
constructs an object, never when JAX rebuilds one inside ``jit``/``vmap``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence, TypeVar

import jax

T = TypeVar("T")


def pytree_dataclass(cls: type[T] | None = None, *, static: Sequence[str] = ()) -> Callable | type[T]:
  """Makes ``cls`` a frozen dataclass and a pytree; ``static`` names metadata fields."""

  def wrap(klass):
    klass = dataclasses.dataclass(frozen=True, eq=False, repr=True)(klass)
    names = [f.name for f in dataclasses.fields(klass)]
    unknown = set(static) - set(names)
    if unknown:
      raise TypeError(f"static fields {sorted(unknown)} are not fields of {klass.__name__}")
    data_names = tuple(n for n in names if n not in static)
    meta_names = tuple(n for n in names if n in static)

    def flatten_with_keys(obj):
      children = tuple((jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data_names)
      return children, tuple(getattr(obj, n) for n in meta_names)

    def flatten(obj):
      return tuple(getattr(obj, n) for n in data_names), tuple(getattr(obj, n) for n in meta_names)

    def unflatten(meta, children):
      obj = object.__new__(klass)
      for n, v in zip(data_names, children):
        object.__setattr__(obj, n, v)
      for n, v in zip(meta_names, meta):
        object.__setattr__(obj, n, v)
      return obj

    jax.tree_util.register_pytree_with_keys(klass, flatten_with_keys, unflatten, flatten)
    klass.replace = lambda self, **changes: dataclasses.replace(self, **changes)
    return klass

  return wrap if cls is None else wrap(cls)


def trusted(cls: type[T], **fields) -> T:
  """An instance of a :func:`pytree_dataclass` built from fields that are valid by
  construction (e.g. a solver's own output): skips ``__post_init__``, so validation
  runs once, at the boundary where the data came in."""
  names = {f.name for f in dataclasses.fields(cls)}
  if set(fields) != names:
    raise TypeError(f"{cls.__name__}: fields {sorted(names)} required, got {sorted(fields)}")
  obj = object.__new__(cls)
  for name, value in fields.items():
    object.__setattr__(obj, name, value)
  return obj
