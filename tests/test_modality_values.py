"""ModalityValues: the train step's per-modality metrics, one array each."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arl_jax
from arl_jax import models
from arl_jax.modality_values import ModalityValues
from arl_jax.modality_values import as_dicts


def test_reads_as_a_mapping_in_sorted_order():
  v = ModalityValues.from_mapping({"visual": 2.0, "audio": 1.0, "text": 3.0})
  assert v.names == ("audio", "text", "visual")
  np.testing.assert_array_equal(v.stacked, [1.0, 3.0, 2.0])
  assert list(v) == ["audio", "text", "visual"] and len(v) == 3
  assert "text" in v and "depth" not in v
  assert float(v["visual"]) == 2.0
  assert {m: float(x) for m, x in v.items()} == {
      "audio": 1.0, "text": 3.0, "visual": 2.0}
  assert "audio" in repr(v)
  with pytest.raises(KeyError, match="'depth' is not one of the modalities"):
    v["depth"]


def test_one_leaf_through_jit_and_leading_axes_pass_through():
  f = jax.jit(lambda x: {"a": ModalityValues.from_mapping(
      {"audio": x, "visual": 2 * x})})
  out = f(jnp.float32(1.5))
  assert len(jax.tree.leaves(out)) == 1
  assert isinstance(out["a"], ModalityValues)
  # Stacking steps (as the runner does) keeps the modality axis last.
  steps = jax.tree.map(lambda *xs: jnp.stack(xs), out, f(jnp.float32(3.0)))
  np.testing.assert_array_equal(steps["a"]["visual"], [3.0, 6.0])
  host = as_dicts(jax.device_get(steps))
  assert type(host["a"]) is dict
  np.testing.assert_array_equal(host["a"]["audio"], [1.5, 3.0])
  json.dumps(jax.tree.map(lambda x: x.tolist(), host))


def test_vector_values_keep_their_shape():
  v = ModalityValues.from_mapping({"a": jnp.arange(3.0), "b": -jnp.arange(3.0)})
  assert v.stacked.shape == (3, 2)
  np.testing.assert_array_equal(v["b"], [0.0, -1.0, -2.0])


def _step(names, method):
  dims = {m: 4 + i for i, m in enumerate(names)}
  model = models.multiview_classifier(dims, 3, encoder_widths=(8,))
  rng = np.random.default_rng(0)
  x = {m: jnp.asarray(rng.normal(size=(16, d)), jnp.float32)
       for m, d in dims.items()}
  y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
  params, model_state = models.init_model(model, jax.random.PRNGKey(0), x)
  labels = functools.partial(models.modality_labels, modalities=names)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1, momentum=0.9), labels)
  state = arl_jax.TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(1),
                                    model_state=model_state, method=method,
                                    modalities=names)
  step = arl_jax.make_train_step(models.make_apply_fn(model), tx, method)
  return state, step, {"inputs": x, "labels": y}


@pytest.mark.parametrize("k", [2, 3])
def test_step_returns_one_output_per_metric(k):
  names = ("audio", "text", "visual")[:k]
  state, step, batch = _step(names, arl_jax.ARL())
  _, metrics = jax.jit(step)(state, batch)
  assert len(jax.tree.leaves(metrics)) == len(metrics)
  for key in ("q", "s", "a", "scale", "unimodal_loss", "unimodal_accuracy",
              "nonfinite_rows"):
    assert isinstance(metrics[key], ModalityValues)
    assert metrics[key].names == names and metrics[key].stacked.shape == (k,)
  # The values are the per-modality ones: a_m sums to 1 (Eq. 18's softmax)
  # and each scale is 1 + a_m after the warm-up.
  assert float(sum(metrics["a"].values())) == pytest.approx(1.0, abs=1e-6)
  for m in names:
    assert float(metrics["scale"][m]) == pytest.approx(
        1.0 + float(metrics["a"][m]))


def test_skipped_update_keeps_donated_state_bit_for_bit():
  """A NaN batch under jit with the state donated: every part of the state
  (parameters, momentum, BatchNorm-free model state, the EMA of the method
  state) comes back unchanged and the step counter advances."""
  names = ("audio", "visual")
  method = arl_jax.ARL(estimator="heldout_variance", ema=0.9)
  state, step, batch = _step(names, method)
  heldout = {"inputs": batch["inputs"], "labels": batch["labels"]}
  good = {**batch, "heldout": heldout}
  jstep = jax.jit(step, donate_argnums=0)
  state, _ = jstep(state, good)          # momentum and the EMA are non-zero
  before = jax.device_get(state)
  bad = jax.tree.map(np.array, good)
  bad["inputs"]["audio"][2] = np.nan
  state, metrics = jstep(state, bad)
  assert float(metrics["update_skipped"]) == 1.0
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) + 1
  for part in ("params", "opt_state", "model_state", "method_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, part),
                 getattr(before, part))
  state, metrics = jstep(state, good)
  assert float(metrics["update_skipped"]) == 0.0
