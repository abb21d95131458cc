"""An optax transformation that rescales each modality's encoder gradients."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arl_jax._src import labels as labels_lib
from arl_jax._src import optimizer_checks

Array = jax.Array


class ScaleByModalityState(NamedTuple):
  """PRNG key of the optional gradient noise (OGM-GE's GE)."""
  noise_key: Array


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
        f"parameter labels are {sorted(known)}. Name each encoder's module "
        "after its modality (auto-named modules such as 'Encoder_0' cannot "
        "be matched) and label with arl_jax.label_modalities(modalities).")


def scale_by_modality(
    param_labels: Any | Callable[[Any], Any], *,
    modalities: Sequence[str] | None = None,
    noise_seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Multiplies every leaf of encoder ``m`` by ``modality_scales[m]``.

  ARL's gradient residual (Eqs. 19-20) rescales the gradient reaching encoder
  ``m`` to ``g + a_m g = (1 + a_m) g``. An encoder's parameter gradients are
  linear in that incoming gradient, so this equals multiplying each parameter
  gradient of encoder ``m`` by ``1 + a_m``, which is what this does to
  whatever reaches it::

    u_leaf = modality_scales[label(leaf)] * g_leaf      (labelled leaves)
    u_leaf = g_leaf                                      (all other leaves)

  **Where it goes in the chain matters.** Before an optimiser that is affine
  in the gradient (SGD, momentum, clipping, coupled weight decay) it scales
  the gradient, exactly as the paper does. Before Adam, AdamW, Lion,
  RMSProp or Adafactor it does *nothing*: they normalise each coordinate, so
  a constant factor on a gradient leaf cancels. Put it after those (a
  per-modality step size), or let :func:`with_modality_scales` choose.
  :func:`arl_jax.make_train_step` refuses an optimiser in which the scales
  provably cancel.

  Leaves whose label is not a key of ``modality_scales`` (the fusion head,
  a shared trunk, ...) pass through untouched. The scales are ordinary traced
  arguments: changing them every step does not recompile.

  Optionally (OGM-GE's generalisation enhancement), Gaussian noise is added
  per leaf: ``u_leaf += modality_noise[m] * std(g_leaf) * eps``, ``eps ~
  N(0, I)``, with ``std`` taken over the unscaled leaf as in the OGM-GE
  release.

  Args:
    param_labels: the label of each parameter (a modality name for encoder
      leaves, anything else for the rest): a pytree matched to the
      parameters by path, which may be a prefix tree (``{"audio": "audio",
      "head": "head"}``) and need not have the parameters' container types
      (a dict labels an NNX ``State``), or a callable ``params -> labels``
      such as :func:`arl_jax.label_modalities`. Works inside
      :func:`optax.partition` groups.
    modalities: if given, ``modality_scales`` must have exactly these keys.
    noise_seed: seed of the noise key kept in the state.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``modality_scales`` (``{modality: scalar}``) and optionally
    ``modality_noise`` (``{modality: scalar}``) as keyword arguments.

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
  if modalities is None:
    modalities = getattr(param_labels, "modalities", None)
  if modalities is not None:
    modalities = tuple(modalities)

  def init_fn(params):
    del params
    return ScaleByModalityState(noise_key=jax.random.PRNGKey(noise_seed))

  def update_fn(updates, state, params=None, *, modality_scales,
                modality_noise=None, **extra_args):
    del params, extra_args
    labels, treedef = labels_lib.resolve_labels(param_labels, updates)
    known = {l for l in labels if isinstance(l, str)}
    _check_keys(modality_scales, "modality_scales", known, modalities)
    if modality_noise is not None:
      _check_keys(modality_noise, "modality_noise", known, modalities)
      noise_key, next_key = jax.random.split(state.noise_key)
      state = ScaleByModalityState(next_key)
    out = []
    for i, (g, label) in enumerate(zip(treedef.flatten_up_to(updates), labels)):
      u = g
      if label in modality_scales:
        u = g * jnp.asarray(modality_scales[label]).astype(g.dtype)
      if modality_noise is not None and label in modality_noise:
        eps = jax.random.normal(jax.random.fold_in(noise_key, i), g.shape,
                                g.dtype)
        std = jnp.std(g) + 1e-8
        u = u + jnp.asarray(modality_noise[label]).astype(g.dtype) * std * eps
      out.append(u)
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


Placement = Literal["auto", "gradient", "update"]


def with_modality_scales(
    optimizer: optax.GradientTransformation,
    param_labels: Any | Callable[[Any], Any], *,
    placement: Placement = "auto",
    modalities: Sequence[str] | None = None,
    noise_seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """``optimizer`` with :func:`scale_by_modality` where its scales act.

  * ``"gradient"``: ``chain(scale_by_modality, optimizer)``. The paper's
    gradient scaling (Eqs. 19-20): under SGD with momentum, clipping and
    weight decay the scaled gradient enters the momentum, the clip and the
    decay exactly as the authors' backward hook makes it.
  * ``"update"``: ``chain(optimizer, scale_by_modality)``. A per-modality
    step size ``u_m <- s_m u_m`` after the optimiser's preconditioner: the
    only place a scale survives Adam, AdamW, Lion, RMSProp or Adafactor.
    Under plain SGD (with momentum, no weight decay) and constant scales the
    two placements give the same updates; with scales that change every
    step, ``"update"`` applies the current scale to the whole momentum
    rather than to each step's gradient.
  * ``"auto"`` (default): ``"gradient"`` when the optimiser's update is
    affine in the gradient (probed once on float32 stand-ins of the
    parameters' shapes, over its first updates that depend on the gradient,
    so a learning rate warmed up from 0 or half-precision parameters do not
    mislead it: :func:`arl_jax.optimizer_checks.optimizer_is_affine`), else
    ``"update"`` (also when the probe cannot tell: no update depended on
    the gradient in 16 calls; after the optimiser a scale always acts).
    SGD-family optimisers
    thus reproduce the paper; Adam-family ones get an effective
    per-modality step size. :func:`arl_jax.modality_scale_placement` tells
    which was chosen.

  The state is ``(optimizer state, ScaleByModalityState)`` for every
  placement, so a checkpoint does not depend on the choice.

  Args:
    optimizer: any optax transformation (the whole chain: clipping, weight
      decay, schedule).
    param_labels, modalities, noise_seed: see :func:`scale_by_modality`.
    placement: ``"auto"``, ``"gradient"`` or ``"update"``.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` taking
    ``modality_scales`` (and optionally ``modality_noise``) in ``update``.

  Example:
    >>> import jax.numpy as jnp, optax, arl_jax
    >>> params = {"audio": jnp.ones(3), "visual": jnp.ones(3)}
    >>> labels = arl_jax.label_modalities(["audio", "visual"])
    >>> tx = arl_jax.with_modality_scales(optax.adam(0.1), labels)
    >>> grads = {"audio": jnp.full(3, 0.5), "visual": jnp.full(3, 0.5)}
    >>> u, _ = tx.update(grads, tx.init(params), params,
    ...                  modality_scales={"audio": 2.0, "visual": 1.0})
    >>> [round(float(u[m][0]), 3) for m in ("audio", "visual")]
    [-0.2, -0.1]
  """
  if placement not in ("auto", "gradient", "update"):
    raise ValueError(f"placement must be 'auto', 'gradient' or 'update'; got "
                     f"{placement!r}.")
  scale = scale_by_modality(param_labels, modalities=modalities,
                            noise_seed=noise_seed)
  decided: dict[Any, str] = {}

  def resolve(params) -> str:
    if placement != "auto":
      return placement
    key = jax.tree.structure(params), tuple(
        (np.shape(x), str(getattr(x, "dtype", ""))) for x in
        jax.tree.leaves(params))
    if key not in decided:
      affine = optimizer_checks.optimizer_is_affine(optimizer, params)
      decided[key] = "gradient" if affine else "update"
    return decided[key]

  def init_fn(params):
    resolve(params)
    return optimizer.init(params), scale.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    opt_state, scale_state = state
    where = resolve(updates if params is None else params)
    scale_args = {k: extra_args[k] for k in ("modality_scales",
                                             "modality_noise")
                  if k in extra_args}
    if "modality_scales" not in scale_args:
      raise TypeError("update() needs modality_scales={modality: scale}.")
    inner_args = {k: v for k, v in extra_args.items() if k not in scale_args}
    opt_update = (optimizer.update if not inner_args else
                  optax.with_extra_args_support(optimizer).update)
    if where == "gradient":
      updates, scale_state = scale.update(updates, scale_state, params,
                                          **scale_args)
      updates, opt_state = opt_update(updates, opt_state, params,
                                      **inner_args)
    else:
      updates, opt_state = opt_update(updates, opt_state, params,
                                      **inner_args)
      updates, scale_state = scale.update(updates, scale_state, params,
                                          **scale_args)
    return updates, (opt_state, scale_state)

  update_fn.placement = resolve       # read by modality_scale_placement
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def modality_scale_placement(tx: optax.GradientTransformation,
                             params: Any) -> str:
  """Where :func:`with_modality_scales` puts its scales for ``params``:
  ``"gradient"`` (before the optimiser) or ``"update"`` (after it).

  For ``placement="auto"`` this is the probe's decision (made once per
  parameter structure, shapes and dtypes).

  Raises:
    ValueError: if ``tx`` was not built by :func:`with_modality_scales`.
  """
  resolve = getattr(getattr(tx, "update", None), "placement", None)
  if resolve is None:
    raise ValueError("modality_scale_placement reads a transformation built "
                     "by arl_jax.with_modality_scales; got "
                     f"{type(tx).__name__}.")
  return resolve(params)
