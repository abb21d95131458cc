"""Synthetic K-modality classification problems with a known optimum."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticProblem:
  """Splits of a synthetic problem plus what the optimum is.

  Attributes:
    splits: ``{"train"|"validation"|"test": (inputs, labels)}`` with inputs
      ``{modality: float32 [n, dim]}`` and int32 labels.
    bayes_accuracy: accuracy of the Bayes-optimal classifier on the test split.
    unimodal_bayes_accuracy: ``{modality: accuracy}`` of the Bayes classifier
      that sees only that modality (test split).
    optimal_weights: ``{modality: w_m}``, the inverse-variance weights
      ``w_m ∝ 1 / sigma_m^2`` (normalised to sum to 1) with which the
      per-modality log-likelihoods add up to the Bayes posterior.
  """
  splits: Mapping[str, tuple[dict[str, np.ndarray], np.ndarray]]
  num_classes: int
  bayes_accuracy: float
  unimodal_bayes_accuracy: Mapping[str, float]
  optimal_weights: Mapping[str, float]


def make_linear_gaussian(noise: Mapping[str, float], *, num_classes: int = 4,
                         dim: int | Mapping[str, int] = 8,
                         sizes: Sequence[int] = (2048, 512, 2048),
                         seed: int = 0, nonlinear: bool = False
                         ) -> SyntheticProblem:
  """Linear-Gaussian problem: ``x_m = mu_{y,m} + sigma_m * eps``.

  Class means ``mu_{c,m} ~ N(0, I_dim)`` are drawn once per modality; labels
  are uniform. Given ``y`` the modalities are independent, so the Bayes
  posterior is ``log p(y|x) = const + sum_m -||x_m - mu_{y,m}||^2 /
  (2 sigma_m^2)``: the optimal fusion weights each modality's evidence by
  its inverse variance ``1 / sigma_m^2``. The Bayes accuracy is evaluated
  exactly on the drawn test split (the classifier is known in closed form).

  With ``nonlinear=True`` each modality is observed through a fixed random
  bijection, ``x_m = Q_m g(R_m z_m)`` with ``z_m`` the linear-Gaussian
  sample, ``R_m, Q_m`` random rotations and ``g(u) = u + 0.9 sin(u)``
  (strictly increasing). A bijection preserves the Bayes posterior, so the
  Bayes accuracy is still exact (computed on ``z``), but no linear model
  reaches it.

  Args:
    noise: ``{modality: sigma_m}``, K >= 2.
    num_classes: C.
    dim: feature dimension (one for all, or per modality).
    sizes: (train, validation, test) sizes.
    seed: seed of means and samples.
  """
  if len(noise) < 2:
    raise ValueError(f"need at least two modalities; got {list(noise)}.")
  for m, s in noise.items():
    if not s > 0:
      raise ValueError(f"noise of modality {m!r} must be > 0; got {s}.")
  rng = np.random.default_rng(seed)
  dims = {m: dim[m] if isinstance(dim, Mapping) else dim for m in noise}
  means = {m: rng.normal(size=(num_classes, dims[m])) for m in noise}

  def draw(n):
    y = rng.integers(0, num_classes, size=n).astype(np.int32)
    x = {m: (means[m][y] + noise[m] * rng.normal(size=(n, dims[m])))
         .astype(np.float32) for m in noise}
    return x, y

  latent = dict(zip(("train", "validation", "test"), map(draw, sizes)))

  def log_lik(x, m):
    d = x[m][:, None, :].astype(np.float64) - means[m][None]
    return -np.sum(d * d, axis=-1) / (2 * noise[m] ** 2)

  if nonlinear:
    rot = {m: (_rotation(rng, dims[m]), _rotation(rng, dims[m])) for m in noise}

    def warp(x):
      return {m: ((np.sin(v @ rot[m][0].T) * 0.9 + v @ rot[m][0].T)
                  @ rot[m][1].T).astype(np.float32) for m, v in x.items()}

    splits = {k: (warp(x), y) for k, (x, y) in latent.items()}
  else:
    splits = latent
  x_test, y_test = latent["test"]
  joint = sum(log_lik(x_test, m) for m in noise)
  bayes = float(np.mean(np.argmax(joint, -1) == y_test))
  uni = {m: float(np.mean(np.argmax(log_lik(x_test, m), -1) == y_test))
         for m in noise}
  inv = {m: 1.0 / noise[m] ** 2 for m in noise}
  total = sum(inv.values())
  return SyntheticProblem(splits=splits, num_classes=num_classes,
                          bayes_accuracy=bayes, unimodal_bayes_accuracy=uni,
                          optimal_weights={m: v / total for m, v in inv.items()})


def _rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
  q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
  return q * np.sign(np.diag(r))
