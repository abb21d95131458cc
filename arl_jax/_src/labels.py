"""Which encoder a parameter belongs to: labels by path, for any pytree.

:func:`arl_jax.scale_by_modality` needs one label per parameter leaf (a
modality name for encoder leaves, anything else for the rest). The labels
are matched to the parameters *by path*, so one labelling serves Flax Linen
dicts, Flax NNX ``State`` objects, ``FrozenDict`` s and plain pytrees, and
may be a prefix tree (``{"audio": "audio", "head": "head"}`` labels every
leaf under ``audio``), as :func:`optax.partition` accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax

Path = tuple[str, ...]


def path_names(path: Sequence[Any]) -> Path:
  """``(DictKey('audio'), GetAttrKey('value'))`` -> ``('audio', 'value')``."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def _show(path: Path) -> str:
  return "/".join(path) or "<root>"


def label_modalities(modalities: Sequence[str], *, other: str = "shared"
                     ) -> Callable[[Any], Any]:
  """Labels each leaf by the first key on its path that names a modality.

  ``params["audio"]["Conv_0"]["kernel"]`` gets ``"audio"``, and so does
  ``state["encoders"]["audio"]["kernel"].value`` in an NNX ``State``; a leaf
  whose path names no modality (the fusion head, a shared trunk) gets
  ``other``. Name each encoder's module after its modality (``self.audio =
  ...`` in NNX, ``name="audio"`` or a dict attribute in Linen); auto-named
  modules (``Encoder_0``) cannot be matched. The *first* matching key wins,
  so a head whose own parameters are keyed by modality names
  (``head/audio``) is labelled with that modality too: name those
  ``audio_classifier`` (as :mod:`arl_jax.models` does) or pass a prefix dict
  such as ``{"audio": "audio", "visual": "visual", "head": "head"}``.

  Args:
    modalities: the modality names.
    other: the label of every leaf outside the encoders.

  Returns:
    ``params -> labels``, a pytree with the structure of ``params``, to pass
    to :func:`arl_jax.scale_by_modality`.

  Example:
    >>> import jax.numpy as jnp, arl_jax
    >>> params = {"audio": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    >>> arl_jax.label_modalities(["audio", "visual"])(params)
    {'audio': {'w': 'audio'}, 'head': {'w': 'shared'}}
  """
  if isinstance(modalities, (str, bytes)):
    # frozenset("audio") would be the set of its letters.
    raise TypeError(f"label_modalities takes a sequence of modality names, "
                    f"e.g. [{modalities!r}, ...]; got the string "
                    f"{modalities!r}.")
  wanted = frozenset(modalities)
  if not wanted:
    raise ValueError("label_modalities needs at least one modality name.")
  bad = [m for m in wanted if not isinstance(m, str)]
  if bad:
    raise TypeError(f"modality names must be strings; got {bad}.")

  def labels(params: Any) -> Any:
    def label(path, _):
      for name in path_names(path):
        if name in wanted:
          return name
      return other
    return jax.tree_util.tree_map_with_path(label, params)

  # Read by scale_by_modality: every modality must then get a scale.
  labels.modalities = tuple(sorted(wanted))
  return labels


def resolve_labels(param_labels: Any, tree: Any) -> tuple[list[Any], Any]:
  """One label per leaf of ``tree``: ``(labels in leaf order, treedef)``.

  ``param_labels`` is a label pytree (full or prefix, any container types)
  or a callable ``tree -> label pytree``. Each leaf takes the label at the
  longest prefix of its path that the label tree has.
  """
  labels = param_labels(tree) if callable(param_labels) else param_labels
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  by_path = {path_names(p): label for p, label in
             jax.tree_util.tree_flatten_with_path(labels)[0]}
  out = []
  for path, _ in leaves:
    names = path_names(path)
    for k in range(len(names), -1, -1):
      if names[:k] in by_path:
        out.append(by_path[names[:k]])
        break
    else:
      shown = sorted(_show(p) for p in by_path)[:8]
      raise ValueError(
          f"param_labels gives no label for the parameter at "
          f"{_show(names)!r}: labels are matched to parameters by path (a "
          f"prefix is enough), and the label tree has the paths {shown}. "
          "Use arl_jax.label_modalities(modalities) to label any pytree "
          "(Linen dicts, NNX State) by the modality named on each path.")
  return out, treedef
