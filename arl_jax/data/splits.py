"""Stratified splits: each class divided in the same proportions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int,
                     *, first_nonempty: bool = False) -> list[np.ndarray]:
  """Indices of a stratified split (each class divided by ``fractions``).

  Each class's rows are permuted (one generator seeded by ``seed``, classes
  in sorted order) and cut at the rounded cumulative fractions; each part's
  indices come back sorted. ``first_nonempty``: every class of two or more
  rows has at least one row in the first part.
  """
  rng = np.random.default_rng(seed)
  parts: list[list[int]] = [[] for _ in fractions]
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    bounds = np.round(np.cumsum(fractions) * len(idx)).astype(int)
    if first_nonempty and len(idx) >= 2:
      bounds[0] = max(bounds[0], 1)
    for i, (lo, hi) in enumerate(zip(np.r_[0, bounds[:-1]], bounds)):
      parts[i].extend(idx[lo:hi])
  return [np.sort(np.asarray(p, np.int64)) for p in parts]


def group_holdout(groups: np.ndarray, fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(kept rows, held-out rows)``: whole groups held out, about ``fraction``.

  Groups are taken in a seeded order until the held-out share of the rows
  is as close to ``fraction`` as whole groups allow (at least one group,
  and at least one group kept). Held-out rows then come from groups that no
  kept row comes from: a held-out estimate of how a model does on *new*
  groups (speakers, subjects, sessions), not on the ones it trained on.
  """
  groups = np.asarray(groups)
  names, counts = np.unique(groups, return_counts=True)
  if len(names) < 2:
    raise ValueError(f"a group-disjoint held-out slice needs at least two "
                     f"groups; got {list(names)}.")
  order = np.random.default_rng([seed, 7, 1]).permutation(len(names))
  share = np.cumsum(counts[order]) / len(groups)
  k = int(np.argmin(np.abs(share[:-1] - fraction))) + 1
  held = np.isin(groups, names[order[:k]])
  return np.flatnonzero(~held), np.flatnonzero(held)
