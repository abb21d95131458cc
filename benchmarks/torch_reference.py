"""A PyTorch implementation of the reference ARL training step, from the spec.

Written for the benchmark only (PyTorch is never a dependency of arl_jax). It
follows the authors' release where the spec describes it:

* one encoder per modality (ResNet18 for audio and frames, or MLPs), a shared
  concatenation head; unimodal logits are the head applied with the other
  modalities' features replaced by zeros (bias included);
* loss ``CE(fused) + gamma * sum_m CE(unimodal_m)``;
* the gradient reaching each encoder's output is multiplied in the backward
  pass by ``1 + a_m`` (an autograd function on the encoder output);
* the coefficient statistics (entropies, true-class probabilities) are pulled
  to the host every step (``.item()``), as the release does, and ``a_m`` is
  computed there (paper Eq. 18);
* gradient-norm clipping at 40, SGD with momentum 0.9 and weight decay 1e-4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
  def __init__(self, in_channels):
    super().__init__()
    self.stem = nn.Sequential(
        nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
        nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    layers, cin = [], 64
    for i, cout in enumerate((64, 128, 256, 512)):
      for j in range(2):
        layers.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
        cin = cout
    self.layers = nn.Sequential(*layers)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    return self.layers(self.stem(x)).mean(dim=(2, 3))


class AudioEncoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.net = ResNet18(1)

  def forward(self, x):                 # [B, F, T]
    return self.net(x.unsqueeze(1))


class FrameEncoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.net = ResNet18(3)

  def forward(self, x):                 # [B, T, 3, H, W], frames folded
    b, t = x.shape[:2]
    return self.net(x.flatten(0, 1)).view(b, t, -1).mean(1)


class MLPEncoder(nn.Module):
  def __init__(self, din, width):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(din, width), nn.ReLU())

  def forward(self, x):
    return self.net(x)


class _ScaleGrad(torch.autograd.Function):
  """Identity forward; backward multiplies the incoming gradient by scale[0]."""

  @staticmethod
  def forward(ctx, x, scale):
    ctx.scale = scale   # read at backward time: set after the forward pass
    return x.view_as(x)

  @staticmethod
  def backward(ctx, grad):
    return grad * ctx.scale, None


class ReferenceModel(nn.Module):
  def __init__(self, encoders: dict[str, nn.Module], feature_dims, num_classes):
    super().__init__()
    self.names = list(encoders)
    self.encoders = nn.ModuleDict(encoders)
    self.dims = [feature_dims[m] for m in self.names]
    self.head = nn.Linear(sum(self.dims), num_classes)

  def forward(self, inputs, scales):
    feats = {m: _ScaleGrad.apply(self.encoders[m](inputs[m]), scales[m])
             for m in self.names}
    fused = self.head(torch.cat([feats[m] for m in self.names], 1))
    unimodal = {}
    for m in self.names:
      parts = [feats[k] if k == m else torch.zeros_like(feats[k])
               for k in self.names]
      unimodal[m] = self.head(torch.cat(parts, 1))
    return fused, unimodal


def host_coefficients(unimodal, labels, temperature):
  """Eq. 17/4/18 with the statistics pulled to the host (``.item()``)."""
  names = list(unimodal)
  q, s = {}, {}
  with torch.no_grad():
    for m in names:
      logp = F.log_softmax(unimodal[m].float(), 1)
      h = -(logp.exp() * logp).sum(1).mean().item()
      q[m] = 1.0 / max(h, 1e-6)
      s[m] = logp.exp().gather(1, labels[:, None]).sum().item()
  if len(names) == 2:                    # Eq. 18
    z = [temperature * q[names[0]] / q[names[1]],
         temperature * s[names[0]] / s[names[1]]]
  else:                                  # arl_jax's K-modality extension
    qs, ss, r = sum(q.values()), sum(s.values()), names[-1]
    z = [temperature * (q[m] / qs - s[m] / ss) / (2 * q[r] / qs * s[r] / ss)
         for m in names]
  e = [math.exp(v - max(z)) for v in z]
  return {m: e[i] / sum(e) for i, m in enumerate(names)}


class ReferenceStep:
  """The reference ARL step: forward, host coefficients, scaled backward, SGD."""

  def __init__(self, model, *, temperature=8.0, gamma=4.0, lr=1e-3,
               device="cpu", autocast_dtype=None):
    self.model = model.to(device)
    self.device = device
    self.temperature, self.gamma = temperature, gamma
    self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                               weight_decay=1e-4)
    self.scales = {m: torch.ones(1, device=device) for m in model.names}
    self.autocast_dtype = autocast_dtype

  def __call__(self, inputs, labels):
    self.model.train()
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=self.device.split(":")[0],
                        dtype=self.autocast_dtype or torch.float32,
                        enabled=self.autocast_dtype is not None):
      fused, unimodal = self.model(inputs, self.scales)
      loss = F.cross_entropy(fused, labels) + self.gamma * sum(
          F.cross_entropy(u, labels) for u in unimodal.values())
    a = host_coefficients(unimodal, labels, self.temperature)
    for m, v in a.items():              # read by _ScaleGrad during backward
      self.scales[m].fill_(1.0 + v)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 40.0)
    self.opt.step()
    return loss.detach()


def audio_visual_model(num_classes=6):
  return ReferenceModel({"audio": AudioEncoder(), "visual": FrameEncoder()},
                        {"audio": 512, "visual": 512}, num_classes)


def multiview_model(dims: dict[str, int], width=64, num_classes=10):
  return ReferenceModel({m: MLPEncoder(d, width) for m, d in dims.items()},
                        {m: width for m in dims}, num_classes)
