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


def released(zs, t, clamp=0.3):               # the authors' release
  h = np.array([entropy(z).mean() for z in zs])
  q = 1.0 / np.maximum(h / h.sum(), clamp)
  q = q / q.sum()
  dep = np.array([np.abs(z).mean(0).sum() for z in zs])
  dep = dep / dep.sum()
  if len(zs) == 2:
    return softmax(np.array([dep[1] * q[0] * t, dep[0] * q[1] * t]))
  return softmax(t * q * (1 - dep))


def ogm_ge(zs, y, alpha):                      # OGM-GE Eqs. 9-10
  s = np.array([dependency(z, y) for z in zs])
  k = []
  for m in range(len(zs)):
    rho = s[m] / (np.delete(s, m).mean())
    k.append(1 - np.tanh(alpha * rho) if rho > 1 else 1.0)
  return np.array(k)
