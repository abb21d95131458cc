"""Independent float64 NumPy implementations of the paper's formulas."""

import numpy as np


def log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(z):
  return np.exp(log_softmax(z))


def entropy(z):
  logp = log_softmax(z)
  p = np.exp(logp)
  return -np.where(p > 0, p * logp, 0.0).sum(-1)


def inverse_variance(z, floor=1e-6):          # Eq. 17
  return 1.0 / max(entropy(z).mean(), floor)


def dependency(z, y):                          # Eq. 4 terms
  return softmax(z)[np.arange(len(y)), y].sum()


def eq18(z0, z1, y, t):                        # Eq. 18, two modalities
  q0, q1 = inverse_variance(z0), inverse_variance(z1)
  s0, s1 = dependency(z0, y), dependency(z1, y)
  return softmax(np.array([t * q0 / q1, t * s0 / s1]))


def cross_entropy(z, y):
  return -log_softmax(z)[np.arange(len(y)), y].mean()


def released(z0, z1, t, clamp=0.3):           # the authors' release (K = 2)
  """As the release computes it for its two modalities, line for line."""
  h0, h1 = entropy(z0).mean(), entropy(z1).mean()
  e0, e1 = h0 / (h0 + h1), h1 / (h0 + h1)
  q0, q1 = 1 / max(e0, clamp), 1 / max(e1, clamp)
  q0, q1 = q0 / (q0 + q1), q1 / (q0 + q1)
  d0, d1 = np.abs(z0).mean(0).sum(), np.abs(z1).mean(0).sum()
  d0, d1 = d0 / (d0 + d1), d1 / (d0 + d1)
  return softmax(np.array([d1 * q0 * t, d0 * q1 * t]))


def gradient_residual(g, a):                   # Eqs. 19-20
  """g + a g: what reaches encoder m with the gradient residual."""
  return np.asarray(g, np.float64) + a * np.asarray(g, np.float64)


def ge_noise_std(g, multiplier=1.0):           # OGM-GE's GE
  """Standard deviation of the Gaussian noise OGM-GE adds to a leaf."""
  return multiplier * np.std(np.asarray(g, np.float64))


def ogm_ge(zs, y, alpha):                      # OGM-GE Eqs. 9-10
  s = np.array([dependency(z, y) for z in zs])
  k = []
  for m in range(len(zs)):
    rho = s[m] / (np.delete(s, m).mean())
    k.append(1 - np.tanh(alpha * rho) if rho > 1 else 1.0)
  return np.array(k)
