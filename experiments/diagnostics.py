"""Per-epoch diagnostics of modality imbalance: linear probes.

* :func:`linear_probe_accuracy`: how much of a modality's label information
  its frozen encoder features hold. A ridge classifier (least squares onto
  one-hot labels, standardised features, ridge 1) is fitted on the training
  rows and scored on validation and test. An encoder that concatenation
  starves (the imbalance signature) gives a lower probe accuracy inside the
  multimodal model than when its modality is trained alone.

Fusion weights fitted on held-out rows are the library's
(:func:`arl_jax.fusion_weighting.fit_weightings`).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping

import jax
import numpy as np


def _ridge_classifier(x: np.ndarray, y: np.ndarray, num_classes: int,
                      ridge: float = 1.0):
  x = np.asarray(x, np.float64)
  mean, std = x.mean(0), x.std(0) + 1e-6
  z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
  targets = np.eye(num_classes)[y]
  reg = ridge * np.eye(z.shape[1])
  reg[-1, -1] = 0.0                                  # no ridge on the bias
  w = np.linalg.solve(z.T @ z + reg, z.T @ targets)

  def predict(v):
    v = (np.asarray(v, np.float64) - mean) / std
    return np.argmax(np.concatenate([v, np.ones((len(v), 1))], 1) @ w, -1)

  return predict


def linear_probe_accuracy(
    features: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    splits: Mapping[str, tuple[Mapping[str, np.ndarray], np.ndarray]],
    num_classes: int, modalities, *, batch_size: int = 1024
) -> dict[str, dict[str, float]]:
  """``{modality: {"validation": acc, "test": acc}}`` of per-modality probes.

  ``features(inputs) -> {modality: [n, d]}`` is the model's frozen encoders;
  ``splits`` holds ``train``, ``validation`` and ``test`` in-memory arrays.
  """
  def all_features(x):
    n = len(next(iter(x.values())))
    chunks = [jax.device_get(features({m: v[i:i + batch_size]
                                       for m, v in x.items()}))
              for i in range(0, n, batch_size)]
    return {m: np.concatenate([c[m] for c in chunks]) for m in modalities}

  x_train, y_train = splits["train"]
  f_train = all_features(x_train)
  probes = {m: _ridge_classifier(f_train[m], y_train, num_classes)
            for m in modalities}
  out = {m: {} for m in modalities}
  for split in ("validation", "test"):
    x, y = splits[split]
    f = all_features(x)
    for m in modalities:
      out[m][split] = float(np.mean(probes[m](f[m]) == y))
  return out
