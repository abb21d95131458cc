"""An NNX model as the train step's pure ``apply_fn``.

:func:`arl_jax.make_train_step` (every method: AGM's extra passes, PMR's
features, MLA's sub-steps, data parallelism) takes a pure function over
pytrees. :func:`nnx_apply_fn` splits an NNX model once into its graph, its
parameters (what optax updates) and the rest of its state (BatchNorm
statistics, dropout RNG counters), and merges a fresh copy inside every call:
the model object you built is never mutated by the step::

  apply_fn, params, model_state = nnx_apply_fn(model)
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    model_state=model_state, rng=key)
  step = arl_jax.make_train_step(apply_fn, tx, arl_jax.ARL())

The model's ``__call__(inputs)`` returns ``(fused, {modality: unimodal})``
(``arl_jax.fused_and_unimodal_logits``), or ``(fused, unimodal, features)``
for a method that reads features (PMR). ``train`` switches the model's
``train()``/``eval()`` mode (BatchNorm's running averages, Dropout); ``rng``
reseeds its ``dropout`` stream (and any other ``rng_streams``) for the call.
:func:`nnx_update_model` writes trained parameters and state back into a
model object.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx


def nnx_apply_fn(model: nnx.Module, *,
                 rng_streams: Sequence[str] = ("dropout",)
                 ) -> tuple[Callable[..., Any], Any, Any]:
  """``(apply_fn, params, model_state)`` for :func:`arl_jax.make_train_step`.

  Args:
    model: an NNX module whose call returns ``(fused, {m: unimodal})`` (or
      with features as a third output). Name each encoder attribute after its
      modality, so that :func:`arl_jax.label_modalities` finds it.
    rng_streams: the RNG streams reseeded from the step's ``rng`` at every
      call (streams the model does not have are skipped).

  Returns:
    ``apply_fn(params, model_state, inputs, *, train, rng) -> (outputs,
    new_model_state)``, the parameters and the other state as plain nested
    dicts of arrays (``nnx.Param`` leaves; everything else but the RNG
    streams, e.g. ``BatchStat``). With ``rng=None`` in training the streams
    keep the model's own keys, so dropout draws the same mask at every call.
  """
  # The RNG streams stay out of the state: they are reseeded from the step's
  # key at every call (typed keys and counters would otherwise be averaged
  # over devices and checkpointed like BatchNorm statistics).
  graphdef, params, rng_state, rest = nnx.split(model, nnx.Param,
                                                nnx.RngState, ...)

  def apply_fn(p, model_state, inputs, *, train: bool, rng):
    # A fresh module per call, from the pure trees (never the user's object).
    module = nnx.merge(graphdef, _filled(params, p),
                       jax.tree.map(lambda x: x, rng_state),   # fresh copies
                       _filled(rest, model_state))
    if train:
      module.train()
    else:
      module.eval()
    if rng is not None:
      streams = {name: jax.random.fold_in(rng, i)
                 for i, name in enumerate(rng_streams)
                 if _has_stream(module, name)}
      if streams:
        nnx.reseed(module, **streams)
    outputs = module(inputs)
    _, _, _, new_rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
    return outputs, nnx.to_pure_dict(new_rest) if train else model_state

  return apply_fn, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _filled(template: nnx.State, values: Any) -> nnx.State:
  """``template`` (an ``nnx.State``) with its leaves replaced by ``values``
  (the matching nested dicts)."""
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, values)
  return state


def _has_stream(module: nnx.Module, name: str) -> bool:
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Rngs) and name in node:
      return True
    if isinstance(node, nnx.RngStream) and getattr(node, "tag", None) == name:
      return True
  return False


def nnx_update_model(model: nnx.Module, params: Any, model_state: Any) -> None:
  """Writes trained ``params`` and ``model_state`` (from the train state)
  back into ``model``, in place."""
  _, p, _, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
  nnx.update(model, _filled(p, jax.device_get(params)),
             _filled(rest, jax.device_get(model_state)))
