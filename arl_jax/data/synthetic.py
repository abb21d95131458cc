"""Synthetic K-modality classification problems with a known optimum."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
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
  # Var over the test split of the unimodal Bayes posterior's probability of
  # the true class, per modality (the Var(s_m) of Eqs. 13-16 at the optimum).
  bayes_true_class_variance: Mapping[str, float] | None = None
  # ``inputs -> {modality: [n, C] log p(x_m | y = c)}`` (up to a constant per
  # row), where the generative model is known in closed form.
  log_likelihood: Callable[[Mapping[str, np.ndarray]],
                           dict[str, np.ndarray]] | None = None


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

  Args:
    noise: ``{modality: sigma_m}``, K >= 2.
    num_classes: C.
    dim: feature dimension (one for all, or per modality).
    sizes: (train, validation, test) sizes.
    seed: seed of means and samples.
    nonlinear: deprecated, use :func:`make_nonlinear_gaussian` (the same
      problem).
  """
  if nonlinear:
    warnings.warn("make_linear_gaussian(nonlinear=True) is deprecated: use "
                  "make_nonlinear_gaussian (the same problem).",
                  DeprecationWarning, stacklevel=2)
  return _gaussian_problem(noise, num_classes=num_classes, dim=dim,
                           sizes=sizes, seed=seed, warped=nonlinear)


def make_nonlinear_gaussian(noise: Mapping[str, float], *,
                            num_classes: int = 4,
                            dim: int | Mapping[str, int] = 8,
                            sizes: Sequence[int] = (2048, 512, 2048),
                            seed: int = 0) -> SyntheticProblem:
  """The linear-Gaussian problem seen through a fixed random bijection.

  ``x_m = Q_m g(R_m z_m)`` with ``z_m`` the sample of
  :func:`make_linear_gaussian` (same arguments, same seed: the same draws),
  ``R_m, Q_m`` random rotations and ``g(u) = u + 0.9 sin(u)`` (strictly
  increasing). A bijection preserves the Bayes posterior, so the Bayes
  accuracy is still exact (computed on ``z``), but no linear model reaches
  it. Arguments as :func:`make_linear_gaussian`.
  """
  return _gaussian_problem(noise, num_classes=num_classes, dim=dim,
                           sizes=sizes, seed=seed, warped=True)


def _gaussian_problem(noise, *, num_classes, dim, sizes, seed, warped: bool
                      ) -> SyntheticProblem:
  """Both problems: the linear-Gaussian draws, then (``warped``) the
  bijection's rotations, from one generator."""
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

  if warped:
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


# ------------------------------------------------------------ imbalance --

@dataclasses.dataclass(frozen=True)
class ModalitySpec:
  """How one modality of :func:`make_imbalanced` encodes the label.

  ``kind="gaussian"``: ``x = mu_y + eps``, ``eps ~ N(0, I_dim)``, class
  means drawn with ``||mu_c|| = separation`` (a linear code; in high ``dim``
  a small MLP memorises a few thousand such rows). ``kind="parity"``: the
  ``log2 C`` bits of the label, each carried by the sign pattern of a latent
  pair ``(u, v) = (s_u margin, s_v margin)`` with ``s_u s_v`` the bit (an XOR:
  no linear function of ``(u, v)`` reads it), plus ``N(0, noise^2)`` noise,
  embedded by a random rotation in ``dim`` dimensions (the remaining
  dimensions are pure noise). A parity code needs hidden units to be read,
  so it is learned more slowly than a Gaussian code.
  """
  kind: str
  dim: int
  separation: float = 1.0     # gaussian: norm of the class means
  margin: float = 1.0         # parity: |u| = |v| = margin
  noise: float = 0.5          # parity: std of the latent noise


# Settings of the imbalance family (see make_imbalanced). Chosen once from the
# generative model (unimodal Bayes accuracies), not tuned on any method.
IMBALANCE_SETTINGS = {
    # A memorisable, weaker Gaussian code (1024 noisy dimensions, ~74% Bayes)
    # against a stronger parity code (~90%).
    "memorise_vs_parity": {
        "a": ModalitySpec("gaussian", dim=1024, separation=1.6),
        "b": ModalitySpec("parity", dim=8, margin=1.0, noise=0.52)},
    # A stronger Gaussian code in fewer dimensions against a parity code
    # hidden among more noise dimensions.
    "memorise_vs_parity_wide": {
        "a": ModalitySpec("gaussian", dim=256, separation=1.8),
        "b": ModalitySpec("parity", dim=16, margin=1.0, noise=0.5)},
    # Three modalities: a second, weaker parity code joins.
    "three_modalities": {
        "a": ModalitySpec("gaussian", dim=1024, separation=1.6),
        "b": ModalitySpec("parity", dim=8, margin=1.0, noise=0.52),
        "c": ModalitySpec("parity", dim=8, margin=1.0, noise=0.65)},
    # Control: two Gaussian codes in low dimension, nothing to memorise and
    # nothing slow to learn; concat should match or beat either alone.
    "control": {
        "a": ModalitySpec("gaussian", dim=8, separation=1.6),
        "b": ModalitySpec("gaussian", dim=8, separation=1.9)},
}


def make_imbalanced(specs: Mapping[str, ModalitySpec] | str, *,
                    num_classes: int = 4,
                    sizes: Sequence[int] = (2048, 1024, 4096),
                    seed: int = 0) -> SyntheticProblem:
  """A K-modality problem where modality imbalance happens, with its optimum.

  Modalities are independent given the label, each encoded as in
  :class:`ModalitySpec`; the Bayes posterior is the product of the per-modality
  likelihoods, all in closed form (a parity bit's likelihood is a two-centre
  Gaussian mixture), so the joint and every unimodal Bayes accuracy are exact
  on the drawn test split.

  The imbalance signature (checked by ``experiments.compare``): with a
  memorisable Gaussian modality ``a`` and a stronger parity modality ``b``,
  plain concatenation fits ``a`` first, memorises its training rows and stops
  learning ``b``: it ends below ``b`` trained alone, and a linear probe on
  ``b``'s encoder is worse inside concatenation than alone. The ``control``
  setting has no such gap.

  Args:
    specs: ``{modality: ModalitySpec}`` or a key of
      :data:`IMBALANCE_SETTINGS`.
    num_classes: C, a power of two when any modality is a parity code.
    sizes: (train, validation, test) sizes.
    seed: seed of the codes and the samples.

  Returns:
    A :class:`SyntheticProblem`; ``optimal_weights`` are uniform (each
    modality's log-likelihood enters the Bayes posterior with weight 1).
  """
  if isinstance(specs, str):
    if specs not in IMBALANCE_SETTINGS:
      raise ValueError(f"unknown imbalance setting {specs!r}; known: "
                       f"{sorted(IMBALANCE_SETTINGS)}.")
    specs = IMBALANCE_SETTINGS[specs]
  if len(specs) < 2:
    raise ValueError(f"need at least two modalities; got {list(specs)}.")
  bits = int(round(np.log2(num_classes)))
  for m, spec in specs.items():
    if spec.kind not in ("gaussian", "parity"):
      raise ValueError(f"modality {m!r}: kind must be 'gaussian' or "
                       f"'parity'; got {spec.kind!r}.")
    if spec.kind == "parity" and (2 ** bits != num_classes or
                                  spec.dim < 2 * bits):
      raise ValueError(f"modality {m!r}: a parity code needs C a power of "
                       f"two and dim >= 2 log2 C; got C={num_classes}, "
                       f"dim={spec.dim}.")
  rng = np.random.default_rng(seed)
  codes = {}
  for m, spec in specs.items():
    if spec.kind == "gaussian":
      mu = rng.normal(size=(num_classes, spec.dim))
      codes[m] = mu * spec.separation / np.linalg.norm(mu, axis=1,
                                                       keepdims=True)
    else:
      codes[m] = _rotation(rng, spec.dim)
  label_bits = (np.arange(num_classes)[:, None] >> np.arange(bits)) & 1

  def draw(n):
    y = rng.integers(0, num_classes, size=n).astype(np.int32)
    x = {}
    for m, spec in specs.items():
      if spec.kind == "gaussian":
        x[m] = codes[m][y] + rng.normal(size=(n, spec.dim))
        continue
      su = rng.choice([-1.0, 1.0], size=(n, bits))
      sv = su * (2.0 * label_bits[y] - 1.0)          # s_u s_v = +1 iff bit 1
      latent = np.zeros((n, spec.dim))
      latent[:, 0:2 * bits:2] = su * spec.margin
      latent[:, 1:2 * bits:2] = sv * spec.margin
      latent[:, :2 * bits] += spec.noise * rng.normal(size=(n, 2 * bits))
      latent[:, 2 * bits:] = spec.noise * rng.normal(
          size=(n, spec.dim - 2 * bits))
      x[m] = latent @ codes[m].T
    return {m: v.astype(np.float32) for m, v in x.items()}, y

  splits = dict(zip(("train", "validation", "test"), map(draw, sizes)))

  def log_lik(x, m):
    spec, v = specs[m], x[m].astype(np.float64)
    if spec.kind == "gaussian":
      d = v[:, None, :] - codes[m][None]
      return -0.5 * np.sum(d * d, axis=-1)
    latent = v @ codes[m]                       # rotate back
    u, w = latent[:, 0:2 * bits:2], latent[:, 1:2 * bits:2]
    s2 = 2 * spec.noise ** 2
    a = spec.margin
    # log p(u, w | bit): mixtures over the two sign patterns of each bit.
    same = np.logaddexp(-((u - a) ** 2 + (w - a) ** 2) / s2,
                        -((u + a) ** 2 + (w + a) ** 2) / s2)
    diff = np.logaddexp(-((u - a) ** 2 + (w + a) ** 2) / s2,
                        -((u + a) ** 2 + (w - a) ** 2) / s2)
    per_bit = np.where(label_bits[None, :, :] == 1, same[:, None, :],
                       diff[:, None, :])        # [n, C, bits]
    return per_bit.sum(-1)

  x_test, y_test = splits["test"]
  lik = {m: log_lik(x_test, m) for m in specs}
  joint = sum(lik.values())

  def true_class_variance(l):
    post = np.exp(l - np.logaddexp.reduce(l, axis=-1, keepdims=True))
    return float(np.var(post[np.arange(len(y_test)), y_test]))

  return SyntheticProblem(
      bayes_true_class_variance={m: true_class_variance(l)
                                 for m, l in lik.items()},
      log_likelihood=lambda x: {m: log_lik(x, m) for m in specs},
      splits=splits, num_classes=num_classes,
      bayes_accuracy=float(np.mean(np.argmax(joint, -1) == y_test)),
      unimodal_bayes_accuracy={
          m: float(np.mean(np.argmax(l, -1) == y_test)) for m, l in lik.items()},
      optimal_weights={m: 1.0 / len(specs) for m in specs})
