"""The held-out fusion weighting as a library procedure
(arl_jax.fusion_weighting.collect_logits / fit_weightings /
select_fusion_weighting / weighted_accuracy), against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arl_jax
from arl_jax import fusion_weighting as fw

NAMES = ("audio", "visual")


def _logits(n, seed, strength=(2.0, 0.3)):
  """Logits of an additive head: bias + audio term + visual term."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 4, n)
  bias = rng.normal(size=4).astype(np.float32)
  onehot = np.eye(4)[y]
  terms = {m: (s * onehot + rng.normal(size=(n, 4))).astype(np.float32)
           for m, s in zip(NAMES, strength)}
  uni = {m: bias + t for m, t in terms.items()}
  fused = bias + sum(terms.values())
  return fw.FusionLogits(fused, uni, y)


def _numpy_accuracy(lg, w):
  uni = {m: np.asarray(v, np.float64) for m, v in lg.unimodal.items()}
  bias = (sum(uni.values()) - np.asarray(lg.fused, np.float64)) / (len(uni) - 1)
  z = bias + sum(w[m] * (uni[m] - bias) for m in uni)
  return float(np.mean(np.argmax(z, -1) == lg.labels))


def test_weighted_accuracy_matches_numpy_and_all_ones_is_the_plain_head():
  lg = _logits(200, 0)
  ones = dict.fromkeys(NAMES, 1.0)
  plain = float(np.mean(np.argmax(lg.fused, -1) == lg.labels))
  assert fw.weighted_accuracy(lg, ones) == pytest.approx(plain)
  w = {"audio": 1.7, "visual": 0.2}
  assert fw.weighted_accuracy(lg, w) == pytest.approx(_numpy_accuracy(lg, w))


def test_selection_fits_on_heldout_and_selects_on_validation_only():
  held, val, test = _logits(300, 1), _logits(300, 2), _logits(300, 3)
  sel = fw.select_fusion_weighting(held, val)
  assert set(sel.candidates) == {"none", *fw.WEIGHTINGS}
  assert sel.candidates["none"] == dict.fromkeys(NAMES, 1.0)
  for kind in fw.WEIGHTINGS:
    want = fw.fusion_weights(kind, held.fused, held.unimodal, held.labels)
    for m in NAMES:
      assert sel.candidates[kind][m] == pytest.approx(float(want[m]))
    assert sel.validation_accuracy[kind] == pytest.approx(
        _numpy_accuracy(val, sel.candidates[kind]))
  assert sel.validation_accuracy[sel.kind] == max(
      sel.validation_accuracy.values())
  assert sel.weights == sel.candidates[sel.kind]
  # The weak visual term is down-weighted by the error-based weightings
  # (its true-class probability sits near the prior: a small variance, so
  # the inverse-variance weighting does not, as documented).
  for kind in ("inverse_error", "calibrated"):
    assert sel.candidates[kind]["visual"] < sel.candidates[kind]["audio"]
  # The test split changes nothing in the choice.
  again = fw.select_fusion_weighting(held, val)
  assert again.kind == sel.kind
  assert 0.0 <= fw.weighted_accuracy(test, sel.weights) <= 1.0


def test_ties_prefer_the_plain_head():
  lg = _logits(50, 4, strength=(5.0, 5.0))     # everything right
  sel = fw.select_fusion_weighting(lg, lg)
  if max(sel.validation_accuracy.values()) == sel.validation_accuracy["none"]:
    assert sel.kind == "none"
  with pytest.raises(ValueError, match="no candidate"):
    fw.select_fusion_weighting(lg, lg, kinds=(), include_plain=False)


def test_collect_logits_keeps_counted_rows_of_an_eval_step_in_order():
  def apply_fn(params, model_state, inputs, *, train, rng):
    feats = {m: inputs[m] @ params[m] for m in NAMES}
    head = lambda f: f["audio"] + f["visual"] + params["b"]
    return arl_jax.fused_and_unimodal_logits(head, feats), model_state

  rng = np.random.default_rng(0)
  params = {"audio": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "visual": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
  state = arl_jax.TrainState(step=0, params=params, opt_state=(),
                             model_state={}, rng=jax.random.PRNGKey(0))
  x = {"audio": rng.normal(size=(10, 3)).astype(np.float32),
       "visual": rng.normal(size=(10, 2)).astype(np.float32)}
  y = rng.integers(0, 4, 10)
  mask = np.ones(10, bool)
  mask[[2, 7]] = False
  step = jax.jit(arl_jax.make_eval_step(apply_fn))
  batches = [{"inputs": {m: v[i:i + 5] for m, v in x.items()},
              "labels": y[i:i + 5], "mask": mask[i:i + 5]} for i in (0, 5)]
  lg = fw.collect_logits(step, state, batches)
  np.testing.assert_array_equal(lg.labels, y[mask])
  want = x["audio"] @ np.asarray(params["audio"]) + x["visual"] @ np.asarray(
      params["visual"]) + np.asarray(params["b"])
  np.testing.assert_allclose(lg.fused, want[mask], rtol=1e-5, atol=1e-5)
  assert set(lg.unimodal) == set(NAMES)
  with pytest.raises(ValueError, match="empty"):
    fw.collect_logits(step, state, [])


def test_the_runner_fits_every_seed_in_one_program_as_the_library_does():
  from experiments import evaluation
  seeds = 3
  helds = [_logits(120, 10 + s, strength=(2.0, 0.3 + 0.4 * s))
           for s in range(seeds)]
  splits = []
  for split in (20, 30):
    splits.append([{"fused_logits": lg.fused, "unimodal_logits": lg.unimodal,
                    "labels": lg.labels}
                   for lg in (_logits(150, split + s) for s in range(seeds))])
  got = evaluation.weighted_evaluations(helds, *splits)
  assert len(got) == seeds
  for s in range(seeds):
    want = fw.fit_weightings(helds[s])
    assert set(got[s]) == set(want)
    for kind, weights in want.items():
      for m in NAMES:
        assert got[s][kind]["weights"][m] == pytest.approx(weights[m],
                                                           rel=1e-4)
      for key, r in (("val_accuracy", splits[0][s]),
                     ("test_accuracy", splits[1][s])):
        lg = fw.FusionLogits(r["fused_logits"], r["unimodal_logits"],
                             r["labels"])
        assert got[s][kind][key] == pytest.approx(
            _numpy_accuracy(lg, got[s][kind]["weights"]), abs=1 / 150 + 1e-9)
  # The seeds' weights are their own.
  assert got[0]["calibrated"]["weights"] != got[2]["calibrated"]["weights"]
