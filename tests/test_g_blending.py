"""G-Blending: weights from given loss curves (by hand), the loss it trains,
and the runner's copy training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_runner import tiny_synthetic

import arl_jax
from arl_jax.methods import g_blending
from experiments import train


def test_weights_from_given_loss_curves():
  curves = {"fused": (10.0, 4.0, 3.0, 2.0),     # G = -1, O = (2-4)-(3-10) = 5
            "audio": (10.0, 6.0, 3.0, 2.5),     # G = -0.5, O = -3.5+7 = 3.5
            "visual": (10.0, 2.0, 3.0, 2.9)}    # G = -0.1, O = 0.9+7 = 7.9
  raw = {"fused": 1 / 25, "audio": 0.5 / 3.5 ** 2, "visual": 0.1 / 7.9 ** 2}
  total = sum(raw.values())
  w = g_blending.blending_weights(curves)
  for k in raw:
    assert w[k] == pytest.approx(raw[k] / total, rel=1e-12)
  # MultiBench's reading: |V_last| / max(O, 1e-4)^2.
  mb = g_blending.blending_weights(curves, "multibench")
  raw = {"fused": 2 / 25, "audio": 2.5 / 3.5 ** 2, "visual": 2.9 / 7.9 ** 2}
  total = sum(raw.values())
  for k in raw:
    assert mb[k] == pytest.approx(raw[k] / total, rel=1e-12)
  # O = 0 (no overfitting measured) does not divide by zero.
  guarded = g_blending.blending_weights({"fused": (1.0, 1.0, 1.0, 1.0),
                                         "audio": (10.0, 6.0, 3.0, 2.5)})
  assert sum(guarded.values()) == pytest.approx(1.0)


def test_step_loss_is_the_weighted_sum_of_the_heads():
  def apply(params, model_state, inputs, *, train, rng):
    feats = {m: inputs[m] @ params[m] for m in ("audio", "visual")}
    head = lambda f: f["audio"] @ params["ha"] + f["visual"] @ params["hv"]
    return arl_jax.fused_and_unimodal_logits(head, feats), model_state
  rng = np.random.default_rng(0)
  params = {m: jnp.asarray(rng.normal(size=(4 if m in ("audio", "visual")
                                          else 3, 3)), jnp.float32)
            for m in ("audio", "visual", "ha", "hv")}
  x = {m: np.float32(rng.normal(size=(8, 4))) for m in ("audio", "visual")}
  y = np.int32(rng.integers(0, 3, 8))
  method = arl_jax.GBlending()
  tx = arl_jax.with_modality_scales(optax.sgd(0.1),
                                    arl_jax.label_modalities(("audio",
                                                              "visual")))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    rng=jax.random.PRNGKey(0), method=method,
                                    modalities=("audio", "visual"))
  weights = {"fused": 0.5, "audio": 0.3, "visual": 0.2}
  state = state.replace(method_state={"weights": {
      k: jnp.float32(v) for k, v in weights.items()}})
  _, metrics = jax.jit(arl_jax.make_train_step(apply, tx, method))(
      state, {"inputs": x, "labels": y})
  (fused, uni), _ = apply(params, {}, x, train=True, rng=None)
  ce = lambda z: float(optax.softmax_cross_entropy_with_integer_labels(
      z, y).mean())
  want = 0.5 * ce(fused) + 0.3 * ce(uni["audio"]) + 0.2 * ce(uni["visual"])
  assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
  assert float(metrics["a"]["audio"]) == pytest.approx(0.3)


def test_runner_estimates_weights_on_validation_copies(tmp_path):
  c = tiny_synthetic(epochs=2, **{"method.name": "g_blending",
                                  "method.super_epoch": 1})
  train.train_and_evaluate(c, tmp_path / "gb")
  history = [json.loads(l) for l in
             (tmp_path / "gb" / "metrics.jsonl").read_text().splitlines()]
  record = history[0]["method"]
  assert set(record["weights"]) == {"fused", "audio", "visual"}
  assert sum(record["weights"].values()) == pytest.approx(1.0)
  # The weights it trains with are those (the last estimation's).
  assert history[0]["a"]["audio"] == pytest.approx(
      record["weights"]["audio"], rel=1e-5)
  # Each head's copy trained: its training loss fell over the copy-epoch.
  for t0, t1, v0, v1 in record["curves"].values():
    assert np.isfinite([t0, t1, v0, v1]).all()
