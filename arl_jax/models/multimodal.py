"""A multimodal classifier built from ``{modality: encoder}`` and a fusion head."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from arl_jax._src import validation as _validation
from arl_jax._src.labels import label_modalities
from arl_jax._src.unimodal import fused_and_unimodal_logits


class MultimodalClassifier(nn.Module):
  """Encoders per modality, one shared fusion-and-classifier head.

  ``__call__`` returns ``(fused_logits, {modality: unimodal_logits})``; the
  unimodal logits are the same head with the other modalities' features
  zeroed (:func:`arl_jax.fused_and_unimodal_logits`), so ARL needs no extra
  parameters. The parameter tree has one top-level subtree per modality named
  after it (plus the head's), so :func:`arl_jax.scale_by_modality` addresses
  each encoder by name (see :func:`modality_labels`).

  Attributes:
    encoders: ``{modality: encoder module}``; an encoder maps
      ``(x, train)`` to ``[batch, features]``.
    head: the fusion-and-classifier, ``{modality: features} -> logits``.
  """
  encoders: Mapping[str, nn.Module]
  head: nn.Module

  def check_inputs(self, inputs: Mapping[str, Any]) -> None:
    """Raises a ValueError naming the modality if an input's shape is wrong.

    Runs on shapes only, so inside ``jax.jit`` it fails at trace time, before
    anything is compiled.
    """
    names = tuple(self.encoders)
    if "head" in names:
      raise ValueError("'head' is the fusion head's subtree; rename that "
                       "modality.")
    _validation.check_same_modalities(names, inputs, "inputs")
    batch = None
    for m in names:
      shape = tuple(np.shape(inputs[m]))
      expected = getattr(self.encoders[m], "expected_shape", lambda: None)()
      if expected is not None and (
          len(shape) != len(expected) + 1 or
          any(e is not None and e != s for e, s in zip(expected, shape[1:]))):
        want = ", ".join("any" if e is None else str(e) for e in expected)
        raise ValueError(f"input of modality {m!r} has shape {shape}; its "
                         f"encoder expects [batch, {want}].")
      if batch is None:
        batch, first = shape[0], m
      elif shape[0] != batch:
        raise ValueError(f"input of modality {m!r} has batch size {shape[0]} "
                         f"but {first!r} has {batch}.")

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], train: bool = False,
               fused_only: bool = False, features_only: bool = False,
               with_features: bool = False):
    """Returns ``(fused, {m: unimodal})``; only ``fused`` if ``fused_only``;
    the encoders' ``{m: features}`` if ``features_only`` (linear probes);
    ``(fused, {m: unimodal}, {m: features})`` if ``with_features`` (PMR)."""
    self.check_inputs(inputs)
    names = tuple(self.encoders)
    features = {m: self.encoders[m].clone(parent=self, name=m)(inputs[m], train)
                for m in names}
    if features_only:
      return features
    if fused_only:
      return self.head(features)
    fused, unimodal = fused_and_unimodal_logits(self.head, features)
    if with_features:
      return fused, unimodal, features
    return fused, unimodal


# One compiled initialiser per model object (several seeds: one
# compilation), by identity (Linen modules holding dicts are not hashable);
# an entry goes with its model.
_INITS: dict[int, tuple[Any, Callable]] = {}


def _jitted_init(model: nn.Module):
  entry = _INITS.get(id(model))
  if entry is None or entry[0]() is not model:
    key, cache = id(model), _INITS

    def forget(_):
      cache.pop(key, None)

    ref = weakref.ref(model, forget)
    # The compiled function holds the model weakly: the cache never keeps
    # a model alive.
    init = jax.jit(lambda r, x: ref().init(r, x, train=False))
    _INITS[key] = entry = (ref, init)
  return entry[1]


def init_model(model: nn.Module, rng: jax.Array,
               inputs: Mapping[str, Any]) -> tuple[Any, Any]:
  """Initialises ``model`` on example ``inputs``; returns (params, model_state)."""
  # Jitted: initialising a ResNet18 op by op takes tens of seconds on a CPU.
  try:
    init = _jitted_init(model)
  except TypeError:           # no weak reference to this object
    init = jax.jit(lambda r, x: model.init(r, x, train=False))
  variables = dict(init(rng, inputs))
  params = variables.pop("params")
  return params, variables


def make_apply_fn(model: nn.Module, with_features: bool = False
                  ) -> Callable[..., Any]:
  """Adapts a Linen multimodal model to the train step's ``apply_fn``.

  The returned function has the signature
  ``(params, model_state, inputs, *, train, rng) -> (outputs, new_model_state)``
  with ``model_state`` the non-parameter collections (``batch_stats``); in
  training every collection present is mutable and updated, in evaluation
  none is. ``with_features``: the outputs are ``(fused, unimodal,
  features)``, for a method that reads the encoders' features (PMR).

  The function also carries the model in two parts, ``apply_fn.encode(params,
  model_state, inputs) -> {m: features}`` (evaluation mode) and
  ``apply_fn.classify(params, features) -> logits`` (the fusion head), which
  the train step hands to a method's loss (``LossContext.encode`` /
  ``LossContext.classify``).
  """
  extra = {"with_features": True} if with_features else {}

  def encode(params, model_state, inputs):
    """The encoders' evaluation-mode ``{m: features}`` (differentiable)."""
    return model.apply({"params": params, **model_state}, inputs, train=False,
                       features_only=True)

  def classify(params, features):
    """The fusion head alone: ``{m: features} -> logits``."""
    return model.apply({"params": params}, features, method=_call_head)

  def apply_fn(params, model_state, inputs, *, train: bool, rng):
    variables = {"params": params, **model_state}
    rngs = {} if rng is None else {"dropout": rng}
    if train and model_state:
      outputs, new_state = model.apply(variables, inputs, train=True, rngs=rngs,
                                       mutable=list(model_state), **extra)
      return outputs, dict(new_state)
    outputs = model.apply(variables, inputs, train=train, rngs=rngs, **extra)
    return outputs, model_state

  # The model in two parts, for methods that recombine features (AGM's
  # zeroed-input passes run each encoder once instead of once per subset).
  apply_fn.encode = encode
  apply_fn.classify = classify
  return apply_fn


def _call_head(module: nn.Module, features):
  return module.head(features)


def modality_labels(params: Mapping[str, Any], modalities,
                    other: str = "shared") -> Any:
  """Labels each leaf by the modality its path names, else ``other``.

  ``arl_jax.label_modalities(modalities, other=other)(params)``; pass the
  result (or ``functools.partial(modality_labels, modalities=...)``) to
  :func:`arl_jax.scale_by_modality`. Works on any pytree (Linen dicts, NNX
  ``State``).
  """
  return label_modalities(modalities, other=other)(params)


