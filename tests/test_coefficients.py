import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import arl_jax


def _problem(seed, names, batch, classes, scales=None):
  rng = np.random.default_rng(seed)
  scales = scales or {m: 1.0 + i for i, m in enumerate(names)}
  logits = {m: (scales[m] * rng.normal(size=(batch, classes))).astype(np.float32)
            for m in names}
  labels = rng.integers(0, classes, size=batch).astype(np.int32)
  return logits, labels


@pytest.mark.parametrize("batch,classes", [(2, 2), (16, 6), (64, 34)])
@pytest.mark.parametrize("temperature", [0.5, 4.0, 8.0])
def test_two_modalities_is_exactly_eq18(batch, classes, temperature):
  for seed in range(5):
    logits, labels = _problem(seed, ("audio", "visual"), batch, classes)
    a = arl_jax.arl_coefficients(logits, labels, temperature)
    want = ref.eq18(logits["audio"], logits["visual"], labels, temperature)
    np.testing.assert_allclose([a["audio"], a["visual"]], want, rtol=2e-5,
                               atol=1e-7)


@pytest.mark.parametrize("names", [("visual", "audio"),
                                   ("visual", "text", "audio")])
def test_sorted_names_not_insertion_order_eager_jit_and_train_step(names):
  """m0 is the first name in sorted order: eager == jit == the train step.

  JAX sorts dict keys when it flattens, so an insertion-order rule gave other
  coefficients under jit (issue: {visual 0.629, audio 0.371} eagerly against
  {audio 0.456, visual 0.544} jitted).
  """
  logits, labels = _problem(3, names, 32, 6)
  assert list(logits) == list(names)          # non-alphabetical insertion
  eager = arl_jax.arl_coefficients(logits, labels, 4.0)
  jitted = jax.jit(lambda l, y: arl_jax.arl_coefficients(l, y, 4.0))(
      logits, labels)
  order = sorted(names)
  if len(names) == 2:
    want = ref.eq18(logits[order[0]], logits[order[1]], labels, 4.0)
  else:   # the same result whatever the insertion order
    shuffled = {m: logits[m] for m in ("audio", "visual", "text")}
    want = [arl_jax.arl_coefficients(shuffled, labels, 4.0)[m] for m in order]
  for got in (eager, jitted):
    np.testing.assert_allclose([got[m] for m in order], want, rtol=2e-5)
  # The train step, fed these logits as the model's unimodal outputs.
  fused = sum(logits.values())

  def apply_fn(params, model_state, inputs, *, train, rng):
    del inputs, train, rng
    return (fused + 0 * sum(params.values()), dict(logits)), model_state

  import optax
  params = {m: jnp.zeros(()) for m in names}
  tx = optax.chain(arl_jax.scale_by_modality(arl_jax.label_modalities(names)),
                   optax.sgd(0.1))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    rng=jax.random.PRNGKey(0))
  step = arl_jax.make_train_step(apply_fn, tx, arl_jax.ARL(temperature=4.0),
                                 check_tx=False)
  batch = {"inputs": {m: jnp.zeros((32, 1)) for m in names},
           "labels": jnp.asarray(labels)}
  _, metrics = jax.jit(step)(state, batch)
  np.testing.assert_allclose([metrics["a"][m] for m in order], want, rtol=2e-5)


@pytest.mark.parametrize("names", [("a", "b", "c"), ("a", "b", "c", "d", "e")])
def test_k_modalities_favour_largest_share_deficit(names):
  for seed in range(40):
    rng = np.random.default_rng(seed)
    scales = {m: float(rng.uniform(0.2, 4.0)) for m in names}
    logits, labels = _problem(seed, names, 24, 5, scales)
    a = arl_jax.arl_coefficients(logits, labels, 4.0)
    q = np.array([ref.inverse_variance(logits[m]) for m in names])
    s = np.array([ref.dependency(logits[m], labels) for m in names])
    deficit = q / q.sum() - s / s.sum()
    got = np.array([a[m] for m in names])
    np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-5)
    assert np.argmax(got) == np.argmax(deficit)
    # Monotone: ordering of coefficients follows the ordering of deficits.
    np.testing.assert_array_equal(np.argsort(got), np.argsort(deficit))


def test_k3_formula_matches_numpy():
  names = ("a", "b", "c")
  logits, labels = _problem(7, names, 16, 4)
  t = 4.0
  q = np.array([ref.inverse_variance(logits[m]) for m in names])
  s = np.array([ref.dependency(logits[m], labels) for m in names])
  qh, sh = q / q.sum(), s / s.sum()
  want = ref.softmax(t * (qh - sh) / (2 * qh[-1] * sh[-1]))
  got = arl_jax.arl_coefficients(logits, labels, t)
  np.testing.assert_allclose([got[m] for m in names], want, rtol=2e-5)
  got = arl_jax.arl_coefficients(logits, labels, t, reference="a")
  want = ref.softmax(t * (qh - sh) / (2 * qh[0] * sh[0]))
  np.testing.assert_allclose([got[m] for m in names], want, rtol=2e-5)


def test_coefficients_carry_no_gradient():
  logits, labels = _problem(0, ("a", "b"), 8, 3)

  def f(za, zb):
    a = arl_jax.arl_coefficients({"a": za, "b": zb}, labels, 4.0)
    return a["a"] * 3.0 + a["b"]

  ga, gb = jax.grad(f, argnums=(0, 1))(jnp.asarray(logits["a"]),
                                       jnp.asarray(logits["b"]))
  np.testing.assert_array_equal(ga, 0.0)
  np.testing.assert_array_equal(gb, 0.0)


@pytest.mark.parametrize("fn,arg", [
    (arl_jax.arl_coefficients, 8.0),
    (arl_jax.released_arl_coefficients, 8.0),
    (arl_jax.ogm_ge_coefficients, 0.5),
])
def test_saturated_and_degenerate_logits_give_finite_coefficients(fn, arg):
  labels = jnp.array([0, 1, 2, 0])
  onehot = jnp.eye(3)[labels]
  cases = [
      {"a": onehot * 1e4, "b": onehot * 1e4},            # both saturated, right
      {"a": onehot * 1e4, "b": -onehot * 1e4},           # b saturated, wrong
      {"a": jnp.zeros((4, 3)), "b": jnp.zeros((4, 3))},  # all zeros
      {"a": onehot * 1e30, "b": onehot * 3.0},
      {"a": onehot * 1e4, "b": onehot, "c": -onehot * 1e4},
  ]
  for logits in cases:
    a = fn(logits, labels, arg)
    values = np.array([a[m] for m in logits])
    assert np.all(np.isfinite(values)), (logits, values)


def test_nonfinite_rows_do_not_reach_coefficients():
  logits, labels = _problem(4, ("a", "b"), 10, 4)
  bad = {m: v.copy() for m, v in logits.items()}
  bad["b"][2] = np.nan
  keep = np.arange(10) != 2
  a = arl_jax.arl_coefficients(bad, labels, 4.0)
  want = arl_jax.arl_coefficients({m: v[keep] for m, v in logits.items()},
                                  labels[keep], 4.0)
  np.testing.assert_allclose([a["a"], a["b"]], [want["a"], want["b"]],
                             rtol=1e-6)
  # A modality with no finite row: neutral coefficients, not NaN.
  bad["b"][:] = np.nan
  for fn, neutral in ((arl_jax.arl_coefficients, 0.5),
                      (arl_jax.released_arl_coefficients, 0.5),
                      (arl_jax.ogm_ge_coefficients, 1.0)):
    a = fn(bad, labels, 4.0)
    np.testing.assert_allclose([a["a"], a["b"]], [neutral, neutral])


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_released_rule_matches_numpy(names):
  logits, labels = _problem(5, names, 32, 6)
  a = arl_jax.released_arl_coefficients(logits, labels, 8.0)
  np.testing.assert_allclose([a[m] for m in names],
                             ref.released([logits[m] for m in names], 8.0),
                             rtol=2e-5)


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_ogm_ge_matches_numpy(names):
  for seed in range(4):
    logits, labels = _problem(seed, names, 32, 6)
    k = arl_jax.ogm_ge_coefficients(logits, labels, 0.3)
    np.testing.assert_allclose([k[m] for m in names],
                               ref.ogm_ge([logits[m] for m in names], labels,
                                          0.3), rtol=2e-5)
    # Exactly the dominant modality (rho > 1) is damped when K = 2.
    if len(names) == 2:
      assert min(float(k["a"]), float(k["b"])) < 1.0
      assert max(float(k["a"]), float(k["b"])) == 1.0


def test_coefficients_jit_and_vmap():
  logits, labels = _problem(1, ("a", "b"), 16, 6)
  jitted = jax.jit(lambda z, y: arl_jax.arl_coefficients(z, y, 8.0))(
      logits, labels)
  eager = arl_jax.arl_coefficients(logits, labels, 8.0)
  np.testing.assert_allclose(jitted["a"], eager["a"], rtol=1e-6)
  stacked = {m: np.stack([v, v[::-1]]) for m, v in logits.items()}
  labels2 = np.stack([labels, labels[::-1]])
  batched = jax.vmap(lambda z, y: arl_jax.arl_coefficients(z, y, 8.0))(
      stacked, labels2)
  np.testing.assert_allclose(batched["a"], [eager["a"]] * 2, rtol=1e-5)
