"""A user's own multimodal arrays as a data source (one ``.npz`` file).

The runner's sources are fixed problems; this one is yours: three splits of
``{modality: array}`` inputs and integer labels, and optionally a group per
row (speaker, subject, session) so that a held-out slice can be made of
whole groups (:func:`arl_jax.data.group_holdout`, the runner's
``data.heldout_by_group``).

  >>> from arl_jax.data import arrays
  >>> arrays.save_arrays("mine.npz", {"train": (x_tr, y_tr), ...},
  ...                    groups={"train": speakers_tr, ...})   # doctest: +SKIP
  >>> problem = arrays.load_arrays("mine.npz")                  # doctest: +SKIP

and in the runner ``--config.data.source=arrays --config.data.path=mine.npz``
(``python -m experiments.compare --arrays mine=mine.npz`` adds it to the
comparison). The file holds ``{split}.x.{modality}``, ``{split}.labels``,
optionally ``{split}.groups``, and ``num_classes``; every array is checked on
save and on load, and a problem is named with the split, modality and rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import zipfile
from collections.abc import Mapping

import numpy as np

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class ArrayProblem:
  """Splits ``{split: ({modality: [rows, ...]}, labels [rows])}``, the
  number of classes, the groups per split (or None) and the file's SHA-256."""
  splits: dict
  num_classes: int
  groups: dict | None = None
  sha256: str | None = None

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(sorted(self.splits["train"][0]))


def check_arrays(splits: Mapping, groups: Mapping | None = None,
                 num_classes: int | None = None) -> int:
  """Validates the splits (and groups); returns the number of classes.

  Raises:
    ValueError: naming the split, modality and what is wrong: a missing
      split, different modalities across splits, inputs whose rows do not
      match the labels, non-integer or out-of-range labels, NaN or Inf in
      an input, groups of the wrong length.
  """
  missing = [s for s in SPLITS if s not in splits]
  if missing:
    raise ValueError(f"the arrays lack the split(s) {missing}; give "
                     f"{list(SPLITS)}, each as ({{modality: inputs}}, labels).")
  names = None
  top = -1
  for s in SPLITS:
    try:
      x, y = splits[s]
    except (TypeError, ValueError):
      raise ValueError(f"split {s!r} must be a pair ({{modality: inputs}}, "
                       "labels).") from None
    if not isinstance(x, Mapping) or not x:
      raise ValueError(f"split {s!r}: the inputs must be a non-empty mapping "
                       "{modality: array}.")
    if names is None:
      names = sorted(x)
      if len(names) < 2:
        raise ValueError(f"a multimodal problem needs two or more modalities; "
                         f"got {names}.")
    elif sorted(x) != names:
      raise ValueError(f"split {s!r} has modalities {sorted(x)}, the training "
                       f"split {names}.")
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"split {s!r}: labels must be a 1-D integer array; got "
                       f"shape {y.shape}, dtype {y.dtype}.")
    if len(y) == 0:
      raise ValueError(f"split {s!r} has no rows.")
    if y.min() < 0:
      raise ValueError(f"split {s!r}: labels must be >= 0; found {y.min()}.")
    top = max(top, int(y.max()))
    for m in names:
      v = np.asarray(x[m])
      if v.ndim < 1 or len(v) != len(y):
        raise ValueError(f"split {s!r}, modality {m!r}: {v.shape[:1] or 'no'} "
                         f"rows for {len(y)} labels.")
      if not np.issubdtype(v.dtype, np.number):
        raise ValueError(f"split {s!r}, modality {m!r}: inputs must be "
                         f"numbers; got dtype {v.dtype}.")
      bad = ~np.isfinite(v.reshape(len(v), -1)).all(axis=1)
      if bad.any():
        raise ValueError(f"split {s!r}, modality {m!r}: {int(bad.sum())} "
                         f"row(s) hold NaN or Inf (first: row "
                         f"{int(np.argmax(bad))}).")
      if v.shape[1:] != np.shape(splits["train"][0][m])[1:]:
        raise ValueError(f"split {s!r}, modality {m!r}: rows of shape "
                         f"{v.shape[1:]}, the training split's "
                         f"{np.shape(splits['train'][0][m])[1:]}.")
    if groups is not None:
      if s not in groups:
        raise ValueError(f"groups lack the split {s!r}.")
      if len(np.asarray(groups[s])) != len(y):
        raise ValueError(f"split {s!r}: {len(np.asarray(groups[s]))} groups "
                         f"for {len(y)} rows.")
  classes = top + 1 if num_classes is None else int(num_classes)
  if classes < 2:
    raise ValueError(f"num_classes must be >= 2; got {classes}.")
  if top >= classes:
    raise ValueError(f"labels go up to {top}, outside [0, {classes}).")
  return classes


def save_arrays(path: str | os.PathLike, splits: Mapping, *,
                groups: Mapping | None = None,
                num_classes: int | None = None) -> pathlib.Path:
  """Writes the splits (checked by :func:`check_arrays`) to one ``.npz``."""
  classes = check_arrays(splits, groups, num_classes)
  out = {"num_classes": np.asarray(classes)}
  for s in SPLITS:
    x, y = splits[s]
    out[f"{s}.labels"] = np.asarray(y)
    for m, v in x.items():
      out[f"{s}.x.{m}"] = np.asarray(v)
    if groups is not None:
      out[f"{s}.groups"] = np.asarray(groups[s]).astype(str)
  path = pathlib.Path(path)
  with open(path, "wb") as f:
    np.savez(f, **out)
  return path


def load_arrays(path: str | os.PathLike) -> ArrayProblem:
  """Reads and checks a file written by :func:`save_arrays`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an ``.npz`` (or a damaged one), or arrays that fail
      :func:`check_arrays`; the message names the file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no arrays file at {path}: write one with "
                            "arl_jax.data.arrays.save_arrays.")
  data = path.read_bytes()      # read once: hashed, then parsed
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      content = {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise ValueError(f"{path} is not a readable .npz file ({e}).") from None
  splits, groups = {}, {}
  for s in SPLITS:
    if f"{s}.labels" not in content:
      raise ValueError(f"{path} has no {s}.labels: not a file of save_arrays "
                       f"(keys: {sorted(content)[:8]}).")
    prefix = f"{s}.x."
    x = {k[len(prefix):]: v for k, v in content.items()
         if k.startswith(prefix)}
    splits[s] = (x, content[f"{s}.labels"])
    if f"{s}.groups" in content:
      groups[s] = content[f"{s}.groups"]
  if groups and len(groups) != len(SPLITS):
    raise ValueError(f"{path} has groups for {sorted(groups)} only.")
  num_classes = content.get("num_classes")
  try:
    classes = check_arrays(splits, groups or None,
                           None if num_classes is None else int(num_classes))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return ArrayProblem(splits=splits, num_classes=classes,
                      groups=groups or None,
                      sha256=hashlib.sha256(data).hexdigest())


def file_modalities(path: str | os.PathLike) -> list[str]:
  """The modalities of an arrays file (from its keys, nothing loaded)."""
  with np.load(path, allow_pickle=False) as z:
    return sorted(k[len("train.x."):] for k in z.files
                  if k.startswith("train.x."))
