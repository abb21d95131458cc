"""Probes of an optax optimiser; the public API is :mod:`arl_jax.optimizer_checks`."""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Probe gradients are small so that clipping by a global norm (40 in the
# paper) stays inactive even for tens of millions of parameters.
_PROBE_SCALE = 1e-4


def _stand_ins(tree: Any, scale: float, seed: int) -> Any:
  """Random arrays like ``tree``'s leaves, of magnitude in [scale, ~5 scale].

  Bounded away from zero, so that an optimiser's epsilon (Adam: 1e-8) never
  dominates an entry and hides or fakes a dependence on the scale. Floating
  leaves are float32 whatever their dtype: the probes compare updates to a
  relative 1e-3 / 1e-4, below the rounding of float16 and bfloat16, and
  whether an optimiser is affine or cancels a scale does not depend on it.
  """
  rng = np.random.default_rng(seed)

  def leaf(x):
    shape, dtype = np.shape(x), jnp.dtype(getattr(x, "dtype", np.float32))
    if not jnp.issubdtype(dtype, jnp.floating):
      return jnp.zeros(shape, dtype)
    n = rng.standard_normal(shape, dtype=np.float32)
    return jnp.asarray(np.copysign(1.0 + np.abs(n), n) * scale, jnp.float32)

  return jax.tree.map(leaf, tree)


def _eagerly(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Runs ``fn`` on abstract shapes of its tree arguments, in a fresh thread."""

  @functools.wraps(fn)
  def wrapper(tx, params, *args, **kwargs):
    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      return pool.submit(fn, tx, shapes, *args, **kwargs).result()

  return wrapper


def _leaves(tree: Any) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)
          if np.issubdtype(np.asarray(x).dtype, np.floating)]


def _max_abs(leaves: list[np.ndarray]) -> float:
  return max((float(np.max(np.abs(x))) for x in leaves if x.size),
             default=0.0)


def _max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
  return max((float(np.max(np.abs(x - y))) for x, y in zip(a, b) if x.size),
             default=0.0)


@_eagerly
def optimizer_is_affine(optimizer: optax.GradientTransformation,
                        params: Any, *, max_calls: int = 16) -> bool | None:
  """Whether ``optimizer``'s update is affine in the gradient.

  Runs three copies from a fresh state on stand-ins of ``params`` (float32),
  fed ``0``, ``g`` and ``2g`` at every call, and tests ``u(2g) - u(g) ==
  u(g) - u(0)`` (relative tolerance 1e-3) at the first call, of at most
  ``max_calls``, whose update depends on the gradient: a learning rate
  warmed up from 0, or gradient accumulation, give zero updates at first.
  Returns None when no call's update depended on the gradient.
  """
  p = _stand_ins(params, 0.1, seed=0)
  g = _stand_ins(params, _PROBE_SCALE, seed=1)
  states = [optimizer.init(p)] * 3
  for _ in range(max_calls):
    outs = [optimizer.update(jax.tree.map(lambda x, c=c: c * x, g), st, p)
            for c, st in zip((0.0, 1.0, 2.0), states)]
    states = [st for _, st in outs]
    u = [_leaves(up) for up, _ in outs]
    first = [b - a for a, b in zip(u[0], u[1])]
    second = [b - a for a, b in zip(u[1], u[2])]
    size = _max_abs(first)
    if not np.isfinite(size):
      return None
    if size > 0.0:
      return bool(_max_abs_diff(second, first) <= 1e-3 * size)
  return None


@_eagerly
def scales_take_effect(tx: optax.GradientTransformation, params: Any,
                       modalities: Sequence[str], *, max_calls: int = 16,
                       extra_args: Mapping[str, Any] | None = None
                       ) -> bool | None:
  """Whether ``tx.update``'s result depends on ``modality_scales`` at all.

  Runs ``tx`` from a fresh state twice on the same stand-in gradients, once
  with every scale 1 and once with scales 2, 3, ... per modality, for up to
  ``max_calls`` calls until an update is non-zero (gradient accumulation
  returns zeros at first). Returns False when the two updates agree to a
  relative 1e-4 (the scales provably cancel, e.g. a scale put before Adam),
  True when they differ, None when no update was non-zero.
  """
  extra_args = dict(extra_args or {})
  one = {m: jnp.float32(1.0) for m in modalities}
  other = {m: jnp.float32(2.0 + i) for i, m in enumerate(sorted(modalities))}
  p = _stand_ins(params, 0.1, seed=0)
  g = _stand_ins(params, 1.0, seed=1)
  state_a = state_b = tx.init(p)
  for _ in range(max_calls):
    ua, state_a = tx.update(g, state_a, p, modality_scales=one, **extra_args)
    ub, state_b = tx.update(g, state_b, p, modality_scales=other, **extra_args)
    ua, ub = _leaves(ua), _leaves(ub)
    size = _max_abs(ua)
    if size > 0.0 and np.isfinite(size):
      return bool(_max_abs_diff(ua, ub) > 1e-4 * size)
  return None
