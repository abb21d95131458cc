"""An optax transformation that rescales each modality's encoder gradients."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class ScaleByModalityState(NamedTuple):
  """PRNG key of the optional gradient noise (OGM-GE's GE)."""
  noise_key: Array


def _resolve_labels(param_labels: Any, tree: Any) -> Any:
  labels = param_labels(tree) if callable(param_labels) else param_labels
  try:
    return jax.tree.map(lambda _, label: label, tree, labels)
  except ValueError as e:
    raise ValueError(
        "param_labels must have the same tree structure as the parameters "
        f"(one label per leaf): {e}") from None


def _check_keys(values: Mapping[str, Any], what: str, known: set[str],
                modalities: Sequence[str] | None) -> None:
  if not isinstance(values, Mapping):
    raise ValueError(f"{what} must be a mapping keyed by modality name; got "
                     f"{type(values).__name__}.")
  keys = set(values.keys())
  if modalities is not None and keys != set(modalities):
    raise ValueError(
        f"{what} has keys {sorted(keys)} but this transformation was built for "
        f"modalities {sorted(modalities)}.")
  unknown = keys - known
  if unknown:
    raise ValueError(
        f"{what} names {sorted(unknown)}, which label no parameter; the "
        f"parameter labels are {sorted(known)}.")


def scale_by_modality(
    param_labels: Any | Callable[[Any], Any], *,
    modalities: Sequence[str] | None = None,
    noise_seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Multiplies every gradient leaf of encoder ``m`` by ``modality_scales[m]``.

  ARL's gradient residual (Eqs. 19-20) rescales the gradient reaching encoder
  ``m`` to ``g + a_m g = (1 + a_m) g``. An encoder's parameter gradients are
  linear in that incoming gradient, so this equals multiplying each parameter
  gradient of encoder ``m`` by ``1 + a_m``, which is what this does::

    u_leaf = modality_scales[label(leaf)] * g_leaf      (labelled leaves)
    u_leaf = g_leaf                                      (all other leaves)

  Leaves whose label is not a key of ``modality_scales`` (the fusion head,
  a shared trunk, ...) pass through untouched. The scales are ordinary traced
  arguments: changing them every step does not recompile.

  Optionally (OGM-GE's generalisation enhancement), Gaussian noise is added
  per leaf: ``u_leaf += modality_noise[m] * std(g_leaf) * eps``, ``eps ~
  N(0, I)``, with ``std`` taken over the unscaled gradient leaf as in the
  OGM-GE release.

  Args:
    param_labels: a pytree with the structure of the parameters whose leaves
      are labels (modality names for encoder leaves, anything else for the
      rest), or a callable from parameters to such a pytree, as
      :func:`optax.partition` accepts.
    modalities: if given, ``modality_scales`` must have exactly these keys.
    noise_seed: seed of the noise key kept in the state.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``modality_scales`` (``{modality: scalar}``) and optionally
    ``modality_noise`` (``{modality: scalar}``) as keyword arguments; put it
    first in an :func:`optax.chain` so that clipping and the optimiser see the
    rescaled gradients.

  Example:
    >>> import jax.numpy as jnp, optax, arl_jax
    >>> params = {"audio": jnp.ones(2), "visual": jnp.ones(2), "head": jnp.ones(2)}
    >>> labels = {"audio": "audio", "visual": "visual", "head": "head"}
    >>> tx = optax.chain(arl_jax.scale_by_modality(labels), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params,
    ...                            modality_scales={"audio": 1.5, "visual": 1.0})
    >>> [float(updates[k][0]) for k in ("audio", "visual", "head")]
    [-1.5, -1.0, -1.0]
  """
  if modalities is not None:
    modalities = tuple(modalities)

  def init_fn(params):
    del params
    return ScaleByModalityState(noise_key=jax.random.PRNGKey(noise_seed))

  def update_fn(updates, state, params=None, *, modality_scales,
                modality_noise=None, **extra_args):
    del extra_args
    labels = _resolve_labels(param_labels,
                             updates if params is None else params)
    known = {l for l in jax.tree.leaves(labels) if isinstance(l, str)}
    _check_keys(modality_scales, "modality_scales", known, modalities)

    def scale(g, label):
      if label in modality_scales:
        return g * jnp.asarray(modality_scales[label]).astype(g.dtype)
      return g

    scaled = jax.tree.map(scale, updates, labels)
    if modality_noise is None:
      return scaled, state

    _check_keys(modality_noise, "modality_noise", known, modalities)
    noise_key, next_key = jax.random.split(state.noise_key)
    leaves, treedef = jax.tree.flatten(scaled)
    grads = treedef.flatten_up_to(updates)
    leaf_labels = treedef.flatten_up_to(labels)
    noisy = []
    for i, (u, g, label) in enumerate(zip(leaves, grads, leaf_labels)):
      if label in modality_noise:
        eps = jax.random.normal(jax.random.fold_in(noise_key, i), g.shape,
                                g.dtype)
        std = jnp.std(g) + 1e-8
        u = u + jnp.asarray(modality_noise[label]).astype(g.dtype) * std * eps
      noisy.append(u)
    return jax.tree.unflatten(treedef, noisy), ScaleByModalityState(next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
