"""Minibatches of in-memory arrays as the train step's batch mappings."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np


def pad_to_batch(rows: Sequence, batch_size: int, fill) -> tuple[list, np.ndarray]:
  """``rows`` padded with copies of ``fill`` to ``batch_size``, and the mask.

  The mask is True on ``rows`` and False on the padding, so a last, short
  batch keeps every batch's shape (no recompilation) and its padding is
  never counted. Every batch of :func:`iterate_batches` and of the
  audio-visual pipeline (:mod:`arl_jax.data.av_pipeline`) is made here.
  """
  n = len(rows)
  mask = np.zeros(batch_size, bool)
  mask[:n] = True
  return list(rows) + [fill] * (batch_size - n), mask


def iterate_batches(inputs: Mapping[str, np.ndarray], labels: np.ndarray,
                    batch_size: int, *, shuffle: bool = False, seed: int = 0,
                    epoch: int = 0, drop_last: bool = False
                    ) -> Iterator[dict]:
  """Yields ``{"inputs", "labels", "mask"}`` batches of fixed size.

  With ``drop_last=False`` the last incomplete batch is padded (repeating row
  0) and its padding rows have ``mask`` False, so every example is seen once
  and batch shapes never change (no recompilation). Shuffling is a
  permutation drawn from ``(seed, epoch)``: the same epoch always gives the
  same order, which is what exact resumption needs.
  """
  n = len(labels)
  for m, x in inputs.items():
    if len(x) != n:
      raise ValueError(f"modality {m!r} has {len(x)} rows but there are {n} "
                       "labels.")
  order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
           else np.arange(n))
  stop = n - n % batch_size if drop_last else n
  for start in range(0, stop, batch_size):
    idx, valid = pad_to_batch(order[start:start + batch_size], batch_size,
                              order[0])
    idx = np.asarray(idx)
    yield {"inputs": {m: x[idx] for m, x in inputs.items()},
           "labels": labels[idx], "mask": valid}
