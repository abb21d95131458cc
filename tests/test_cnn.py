"""The small CNN encoder and multiview classifiers built with it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arl_jax
from arl_jax import models

AUDIO = (129, 63)
IMAGE = (16, 15)


def _init(enc, x, seed=0):
  return jax.jit(lambda r, v: enc.init(r, v, train=False))(
      jax.random.PRNGKey(seed), x)


@pytest.mark.parametrize("shape", [AUDIO, IMAGE])
def test_output_shape_and_flat_equals_2d_input(shape):
  enc = models.ConvEncoder(shape, features=24)
  assert enc.expected_shape() == (shape[0] * shape[1],)
  x = np.random.default_rng(0).normal(size=(4,) + shape).astype(np.float32)
  variables = _init(enc, x.reshape(4, -1))
  apply = jax.jit(lambda v, x: enc.apply(v, x))
  flat = apply(variables, x.reshape(4, -1))
  assert flat.shape == (4, 24)
  assert np.all(flat >= 0) and np.any(flat > 0)    # ReLU feature
  np.testing.assert_array_equal(apply(variables, x), flat)
  np.testing.assert_array_equal(apply(variables, x[..., None]), flat)


def _pool(y):
  """2x2/2 VALID max-pool of ``[b, h, w, c]``, skipping axes 1 wide."""
  for axis in (1, 2):
    n = y.shape[axis]
    if n > 1:
      y = np.maximum(np.take(y, np.arange(0, n - n % 2, 2), axis=axis),
                     np.take(y, np.arange(1, n - n % 2 + 1, 2), axis=axis))
  return y


def _numpy_conv(y, p, s):
  """3x3 SAME convolution of ``[b, h, w, cin]`` at stride ``s``, with bias."""
  k = np.asarray(p["kernel"], np.float64)                # [3, 3, cin, cout]
  b, h, w, _ = y.shape
  # SAME: the output side is ceil(n / s), the total padding
  # max((out - 1) * s + 3 - n, 0), the smaller half before.
  outs, pads = [], []
  for n in (h, w):
    out = -(-n // s)
    total = max((out - 1) * s + 3 - n, 0)
    outs.append(out)
    pads.append((total // 2, total - total // 2))
  yp = np.pad(y, ((0, 0), pads[0], pads[1], (0, 0)))
  z = np.zeros((b, outs[0], outs[1], k.shape[-1]))
  for r in range(outs[0]):
    for c in range(outs[1]):
      patch = yp[:, r * s:r * s + 3, c * s:c * s + 3, :]
      z[:, r, c, :] = np.einsum("bijc,ijco->bo", patch, k)
  return z + np.asarray(p["bias"], np.float64)


def _numpy_encoder(params, x, channels, stride=1, pool="space"):
  """The encoder in float64 NumPy, without BatchNorm."""
  y = x.astype(np.float64)[..., None]
  for i, _ in enumerate(channels):
    z = _numpy_conv(y, params[f"conv{i + 1}"], stride if i == 0 else 1)
    y = _pool(np.maximum(z, 0.0))
  if pool == "space":
    feat = y.mean(axis=(1, 2))
  else:              # mean over the second axis; first axis x channels kept
    feat = y.mean(axis=2).reshape(len(y), -1)
  d = params["dense"]
  return np.maximum(feat @ np.asarray(d["kernel"], np.float64)
                    + np.asarray(d["bias"], np.float64), 0.0)


@pytest.mark.parametrize("pool", ["space", "time"])
@pytest.mark.parametrize("shape,channels,stride", [
    ((4, 5), (2,), 1),
    ((5, 4), (2, 3), 1),       # pools 5x4 -> 2x2 -> 1x1
    ((2, 7), (2, 2, 2), 1),    # a 1-wide axis is not pooled further
    ((7, 6), (3,), 2),         # strided first convolution
    ((9, 7), (2, 2), 3),       # non-overlapping 3x3 patches, 3x3 -> 1x1 -> 1x1
])
def test_encoder_matches_float64_numpy(shape, channels, stride, pool):
  enc = models.ConvEncoder(shape, channels=channels, features=3,
                           first_stride=stride, batch_norm=False, pool=pool)
  x = np.random.default_rng(1).normal(size=(3,) + shape).astype(np.float32)
  variables = _init(enc, x, seed=2)
  # Non-zero biases, so that they are checked too.
  params = jax.tree.map(
      lambda p: p + 0.1 * np.random.default_rng(3).normal(size=p.shape)
      .astype(np.float32), variables["params"])
  got = enc.apply({"params": params}, x.reshape(3, -1))
  want = _numpy_encoder(jax.tree.map(np.asarray, params), x, channels, stride,
                        pool)
  assert np.any(want > 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The pre-pooling convolution alone, through Flax's intermediates.
  _, inter = enc.apply({"params": params}, x, capture_intermediates=True)
  conv1 = inter["intermediates"]["conv1"]["__call__"][0]
  np.testing.assert_allclose(
      conv1, _numpy_conv(x.astype(np.float64)[..., None],
                         jax.tree.map(np.asarray, params["conv1"]), stride),
      rtol=1e-5, atol=1e-6)


def test_parameter_tree_and_batch_norm_without_conv_bias():
  enc = models.ConvEncoder(IMAGE, channels=(16, 32), features=64)
  variables = _init(enc, np.zeros((2,) + IMAGE, np.float32))
  shapes = jax.tree.map(np.shape, variables)
  assert shapes["params"]["conv1"] == {"kernel": (3, 3, 1, 16)}
  assert shapes["params"]["conv2"] == {"kernel": (3, 3, 16, 32)}
  assert shapes["params"]["dense"] == {"kernel": (32, 64), "bias": (64,)}
  assert set(shapes["batch_stats"]) == {"norm1", "norm2"}
  count = sum(p.size for p in jax.tree.leaves(variables["params"]))
  # conv 9*16 + 9*16*32, BatchNorm 2*(16+32), dense 32*64 + 64
  assert count == 144 + 4608 + 96 + 2112 == 6960


@pytest.mark.parametrize("shape", [(4, 128 * 63), (4, 129, 62), (4, 129, 63, 3),
                                   (4, 63, 129)])
def test_wrong_input_size_names_the_expected_shape(shape):
  enc = models.ConvEncoder(AUDIO)
  with pytest.raises(ValueError, match=r"\[batch, 8127\].*\[batch, 129, 63\]"):
    enc.init(jax.random.PRNGKey(0), jnp.zeros(shape))


def test_builder_validates_cnn_modalities():
  dims = {"audio": 129 * 63, "image": 240}
  with pytest.raises(ValueError, match="'image'.*input_shapes"):
    models.multiview_classifier(dims, 10, encoders="cnn",
                                input_shapes={"audio": AUDIO})
  with pytest.raises(ValueError, match=r"input_shapes\['image'\]"):
    models.multiview_classifier(dims, 10, encoders="cnn",
                                input_shapes={"audio": AUDIO, "image": (16, 16)})
  with pytest.raises(ValueError, match="'audio'"):
    models.multiview_classifier(dims, 10, encoders={"audio": "rnn",
                                                    "image": "mlp"})
  with pytest.raises(ValueError, match="encoders names"):
    models.multiview_classifier(dims, 10, encoders={"audio": "cnn"},
                                input_shapes={"audio": AUDIO})
  with pytest.raises(ValueError, match="cnn_first_stride names"):
    models.multiview_classifier(dims, 10, encoders="cnn",
                                input_shapes={"audio": AUDIO, "image": IMAGE},
                                cnn_first_stride={"video": 2})
  mixed = models.multiview_classifier(dims, 10, encoder_widths=(32, 8),
                                      encoders={"audio": "cnn", "image": "mlp"},
                                      input_shapes={"audio": AUDIO},
                                      cnn_channels=(4, 8, 8),
                                      cnn_first_stride={"audio": 3})
  assert mixed.encoders["audio"] == models.ConvEncoder(
      AUDIO, channels=(4, 8, 8), features=8, first_stride=3)
  assert mixed.encoders["image"] == models.MLPEncoder((32, 8), input_dim=240)
  # The default is unchanged: MLP encoders of the given widths.
  plain = models.multiview_classifier(dims, 10, encoder_widths=(32, 8))
  assert plain.encoders == {m: models.MLPEncoder((32, 8), input_dim=d)
                            for m, d in dims.items()}


def _cnn_classifier(**kwargs):
  return models.multiview_classifier(
      {"audio": AUDIO[0] * AUDIO[1], "image": IMAGE[0] * IMAGE[1]}, 10,
      encoders={"audio": "cnn", "image": "cnn"},
      input_shapes={"audio": AUDIO, "image": IMAGE}, **kwargs)


def _batch(batch, seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": {"audio": rng.normal(size=(batch, 8127)).astype(np.float32),
                     "image": rng.normal(size=(batch, 240)).astype(np.float32)},
          "labels": rng.integers(0, 10, batch).astype(np.int32)}


def _state_and_step(model, batch):
  params, model_state = models.init_model(model, jax.random.PRNGKey(0),
                                          batch["inputs"])
  labels = functools.partial(models.modality_labels,
                             modalities=("audio", "image"))
  tx = optax.chain(arl_jax.scale_by_modality(labels), optax.sgd(0.01, 0.9))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    model_state=model_state,
                                    rng=jax.random.PRNGKey(1))
  step = jax.jit(arl_jax.make_train_step(models.make_apply_fn(model), tx,
                                         arl_jax.ARL()))
  return state, step


def test_cnn_multiview_classifier_trains_one_arl_step():
  model = _cnn_classifier()
  batch = _batch(8)
  state, step = _state_and_step(model, batch)
  count = sum(p.size for p in jax.tree.leaves(state.params))
  # Per encoder: conv 9*16 + 9*16*32, BatchNorm 2*(16+32), dense 32*64 + 64
  # = 6960; concat head: (64 + 64) * 10 + 10.
  assert count == 2 * 6960 + 1290 == 15210
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert set(metrics["a"]) == {"audio", "image"}
  for leaf in jax.tree.leaves(new_state.params):
    assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b),
                       state.model_state["batch_stats"],
                       new_state.model_state["batch_stats"])
  assert all(jax.tree.leaves(moved))             # every running stat moved
  # Evaluation leaves the statistics alone and does not depend on the batch.
  apply_fn = jax.jit(models.make_apply_fn(model), static_argnames=("train",))
  inputs = _batch(4, seed=1)["inputs"]
  (fused, _), kept = apply_fn(new_state.params, new_state.model_state, inputs,
                              train=False, rng=None)
  jax.tree.map(np.testing.assert_array_equal, kept, new_state.model_state)
  (one, _), _ = apply_fn(new_state.params, new_state.model_state,
                         jax.tree.map(lambda v: v[:1], inputs), train=False,
                         rng=None)
  np.testing.assert_allclose(one, fused[:1], rtol=1e-4, atol=1e-5)


def test_classifier_rejects_unflattened_cnn_input_naming_the_modality():
  model = _cnn_classifier()
  inputs = _batch(2)["inputs"]
  inputs["audio"] = inputs["audio"].reshape(2, *AUDIO)
  with pytest.raises(ValueError, match=r"'audio'.*\[batch, 8127\]"):
    models.init_model(model, jax.random.PRNGKey(0), inputs)


def test_time_pooling_keeps_frequency_positions():
  # A pattern moved along time gives the same feature; moved along frequency
  # it does not (with pool="space" both moves give the same feature).
  x = np.zeros((1, 8, 8), np.float32)
  x[0, 1, 1] = 1.0
  moved_t = np.roll(x, 4, axis=2)
  moved_f = np.roll(x, 4, axis=1)
  for pool, same_f in (("time", False), ("space", True)):
    enc = models.ConvEncoder((8, 8), channels=(2,), features=4,
                             batch_norm=False, pool=pool)
    v = _init(enc, x)
    v = jax.tree.map(lambda p: p + 0.3, v)      # non-zero biases and kernels
    f = lambda z, v=v, enc=enc: np.asarray(enc.apply(v, z))
    np.testing.assert_allclose(f(moved_t), f(x), rtol=1e-6)
    assert np.allclose(f(moved_f), f(x), rtol=1e-6) == same_f
  with pytest.raises(ValueError, match="pool must be"):
    _init(models.ConvEncoder((8, 8), pool="freq"), x)
