"""The stacked per-modality mapping; public API: :mod:`arl_jax.modality_values`."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_with_keys_class
class ModalityValues(Mapping):
  """``{modality: value}`` whose values are ``stacked[..., i]``, i in sorted order.

  Build it with :meth:`from_mapping`; read it as a mapping, or take
  :attr:`stacked` (``[..., K]``) and :attr:`names` directly. Convert a whole
  metrics tree to plain dicts with :func:`as_dicts` (what a JSON or a
  checkpoint writer wants).
  """

  __slots__ = ("names", "stacked")

  def __init__(self, names: tuple[str, ...], stacked: Any):
    self.names = tuple(names)
    self.stacked = stacked

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> ModalityValues:
    """Stacks ``{m: scalar or [...] array}`` along a new last axis."""
    names = tuple(sorted(values))
    if not names:
      raise ValueError("ModalityValues needs at least one modality.")
    return cls(names, jnp.stack([jnp.asarray(values[m]) for m in names],
                                axis=-1))

  def __getitem__(self, name: str) -> Any:
    try:
      index = self.names.index(name)
    except ValueError:
      raise KeyError(f"{name!r} is not one of the modalities "
                     f"{list(self.names)}.") from None
    return self.stacked[..., index]

  def __iter__(self) -> Iterator[str]:
    return iter(self.names)

  def __len__(self) -> int:
    return len(self.names)

  def __contains__(self, name: object) -> bool:
    return name in self.names

  __hash__ = None   # a mapping of arrays: neither hashable nor == comparable

  def __eq__(self, other):
    return NotImplemented

  def __repr__(self) -> str:
    return f"ModalityValues({dict(self.items())!r})"

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey("stacked"), self.stacked),), self.names

  @classmethod
  def tree_unflatten(cls, names, children):
    # No checks: JAX rebuilds nodes around non-array leaves (tracers,
    # ShapeDtypeStructs, None, sentinels).
    obj = object.__new__(cls)
    obj.names, (obj.stacked,) = names, children
    return obj


def as_dicts(tree: Any) -> Any:
  """``tree`` with every :class:`ModalityValues` replaced by a plain dict."""
  return jax.tree.map(
      lambda x: dict(x.items()) if isinstance(x, ModalityValues) else x,
      tree, is_leaf=lambda x: isinstance(x, ModalityValues))


def stack_per_modality(metrics: Mapping[str, Any],
                       names: tuple[str, ...]) -> dict[str, Any]:
  """Each value of ``metrics`` keyed by exactly ``names`` -> ModalityValues."""
  wanted = set(names)
  return {k: (ModalityValues.from_mapping(v)
              if isinstance(v, Mapping) and set(v) == wanted else v)
          for k, v in metrics.items()}
