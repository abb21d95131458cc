"""Input checks shared by the public functions.

Everything here runs on static information (mapping keys, shapes, dtypes), so it
works identically on concrete arrays and on tracers inside ``jax.jit``. Value
checks (labels in range) run only when the labels are concrete.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def modality_names(values: Any, what: str = "logits") -> tuple[str, ...]:
  """Returns the modality names of a per-modality mapping, sorted.

  Sorted, not insertion order: JAX flattens dicts in sorted key order, so a
  mapping that went through ``jit`` or a pytree comes back sorted. Rules that
  are not symmetric in the modalities (Eq. 18) must see one order everywhere.
  """
  if not isinstance(values, Mapping):
    raise ValueError(
        f"{what} must be a mapping keyed by modality name, e.g. "
        f"{{'audio': ..., 'visual': ...}}; got {type(values).__name__}.")
  for name in values.keys():
    if not isinstance(name, str):
      raise ValueError(f"modality names must be strings; got {name!r} in {what}.")
  names = tuple(sorted(values.keys()))
  if len(names) < 2:
    raise ValueError(
        f"{what} must hold at least two modalities; got {list(names)}.")
  return names


def check_same_modalities(expected: Sequence[str], values: Mapping[str, Any],
                          what: str) -> None:
  """Raises if ``values`` is not keyed by exactly the modalities ``expected``."""
  if not isinstance(values, Mapping):
    raise ValueError(f"{what} must be a mapping keyed by modality name; "
                     f"got {type(values).__name__}.")
  got = set(values.keys())
  want = set(expected)
  if got != want:
    missing = sorted(want - got)
    extra = sorted(got - want)
    raise ValueError(
        f"{what} has modality keys {sorted(got)} but {sorted(want)} were "
        f"expected (missing: {missing}, unexpected: {extra}).")


def check_logits(logits: Mapping[str, Any]) -> tuple[tuple[str, ...], int, int]:
  """Checks per-modality logits; returns (names, batch size, class count)."""
  names = modality_names(logits)
  batch = classes = None
  for name in names:
    shape = np.shape(logits[name])
    if len(shape) != 2:
      raise ValueError(
          f"logits for modality {name!r} must have shape [batch, classes]; "
          f"got shape {shape}.")
    if batch is None:
      batch, classes = shape
      first = name
    elif shape != (batch, classes):
      raise ValueError(
          f"logits for modality {name!r} have shape {shape} but those of "
          f"{first!r} have shape {(batch, classes)}; every modality must give "
          "[batch, classes] logits with the same batch and class count.")
  if classes < 2:
    raise ValueError(f"logits need at least two classes; got {classes}.")
  return names, batch, classes


def check_labels(labels: Any, batch: int, classes: int) -> None:
  """Checks integer class labels of shape [batch] (values when concrete)."""
  shape = np.shape(labels)
  if shape != (batch,):
    raise ValueError(
        f"labels must have shape [batch] = ({batch},) to match the logits; "
        f"got shape {shape}.")
  dtype = np.dtype(labels.dtype if hasattr(labels, "dtype")
                   else np.asarray(labels).dtype)
  if not np.issubdtype(dtype, np.integer):
    raise ValueError(
        f"labels must be integer class indices; got dtype {dtype}.")
  if not isinstance(labels, jax.core.Tracer):
    values = np.asarray(labels)
    if values.size and (values.min() < 0 or values.max() >= classes):
      raise ValueError(
          f"labels must lie in [0, {classes}); got values in "
          f"[{values.min()}, {values.max()}].")


def check_mask(mask: Any, batch: int) -> None:
  if mask is not None and np.shape(mask) != (batch,):
    raise ValueError(
        f"mask must have shape [batch] = ({batch},); got {np.shape(mask)}.")


def check_positive(value: Any, what: str) -> None:
  """Raises if a concrete ``value`` is not > 0 (tracers are not checked)."""
  if isinstance(value, jax.core.Tracer):
    return
  if not np.all(np.asarray(value) > 0):
    raise ValueError(f"{what} must be > 0; got {value}.")
