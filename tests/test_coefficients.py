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


@pytest.mark.parametrize("reference", ["audio", "visual"])
def test_extension_is_eq18_at_k2_for_either_reference(reference):
  """The K-modality rule's defining property, checked against Eq. 18 itself
  (not against its own formula): with reference r, the two coefficients are
  Eq. 18 with the other modality as m0 and r as m1."""
  other = "visual" if reference == "audio" else "audio"
  for seed in range(6):
    for t in (0.5, 4.0, 8.0):
      logits, labels = _problem(seed, ("audio", "visual"), 24, 5)
      a = arl_jax.arl_coefficients(logits, labels, t, reference=reference)
      want = ref.eq18(logits[other], logits[reference], labels, t)
      np.testing.assert_allclose([a[other], a[reference]], want, rtol=2e-5,
                                 atol=1e-7)


def test_extension_is_equivariant_to_renaming_the_modalities():
  """Renaming modalities (and the reference with them) renames coefficients."""
  logits, labels = _problem(7, ("a", "b", "c"), 16, 4)
  a = arl_jax.arl_coefficients(logits, labels, 4.0, reference="b")
  renamed = {"z": logits["a"], "y": logits["b"], "x": logits["c"]}
  r = arl_jax.arl_coefficients(renamed, labels, 4.0, reference="y")
  np.testing.assert_allclose([a["a"], a["b"], a["c"]],
                             [r["z"], r["y"], r["x"]], rtol=1e-6)


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
  # Where the value is known: identical modalities (both saturated on the
  # right class, or both all-zero) have identical statistics, so the softmax
  # rules give 1/K and OGM-GE (rho = 1, nothing dominant) leaves them at 1.
  neutral = 1.0 if fn is arl_jax.ogm_ge_coefficients else 0.5
  for logits in cases[0], cases[2]:
    a = fn(logits, labels, arg)
    np.testing.assert_allclose([a["a"], a["b"]], [neutral, neutral],
                               rtol=1e-6)
  if fn is arl_jax.ogm_ge_coefficients:
    # b saturated on the wrong class: a dominates and alone is damped.
    a = fn(cases[1], labels, arg)
    assert float(a["a"]) < 1.0 and float(a["b"]) == 1.0
  else:
    # a saturated right (entropy floored), b with its true class pushed to
    # -1e4 (entropy ln 2, true-class probability 0): against the oracles.
    # ARL: q_a / q_b = ln 2 / 1e-6 (entropy floor) = 6.9e5 is below the
    # dependency ratio s_a / s_b = 4 / 4e-6 (sum floor) = 1e6, so Eq. 18
    # gives b everything.
    a = fn(cases[1], labels, arg)
    z = [np.asarray(cases[1][m]) for m in ("a", "b")]
    want = [0.0, 1.0] if fn is arl_jax.arl_coefficients else ref.released(
        *z, arg)
    np.testing.assert_allclose([a["a"], a["b"]], want, rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("temperature", [1.0, 4.0, 8.0])
def test_released_rule_matches_the_releases_computation(temperature):
  for seed in range(5):
    logits, labels = _problem(seed, ("a", "b"), 32, 6)
    a = arl_jax.released_arl_coefficients(logits, labels, temperature)
    np.testing.assert_allclose([a["a"], a["b"]],
                               ref.released(logits["a"], logits["b"],
                                            temperature), rtol=2e-5)


def test_released_rule_entropy_clamp_is_active():
  """One confident and one uniform modality: the normalised entropy of the
  confident one is ~0 < 0.3, so the release's clamp sets its q."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 6, 32).astype(np.int32)
  confident = (np.eye(6)[labels] * 12.0 + rng.normal(size=(32, 6))).astype(
      np.float32)
  uniform = (0.01 * rng.normal(size=(32, 6))).astype(np.float32)
  h = [ref.entropy(z).mean() for z in (confident, uniform)]
  assert h[0] / sum(h) < 0.3                       # the clamp binds
  a = arl_jax.released_arl_coefficients({"a": confident, "b": uniform},
                                        labels, 8.0)
  want = ref.released(confident, uniform, 8.0)
  np.testing.assert_allclose([a["a"], a["b"]], want, rtol=2e-5)
  unclamped = ref.released(confident, uniform, 8.0, clamp=0.0)
  assert not np.allclose(want, unclamped, rtol=1e-3)


def test_released_rule_k3_properties():
  """The release defines two modalities; the K extension (documented in
  released_arl_coefficients) must sum to 1, not depend on names, and give
  neutral coefficients to identical modalities."""
  logits, labels = _problem(5, ("a", "b", "c"), 32, 6)
  a = arl_jax.released_arl_coefficients(logits, labels, 8.0)
  np.testing.assert_allclose(sum(a.values()), 1.0, rtol=1e-6)
  renamed = {"c": logits["a"], "a": logits["b"], "b": logits["c"]}
  r = arl_jax.released_arl_coefficients(renamed, labels, 8.0)
  np.testing.assert_allclose([a["a"], a["b"], a["c"]],
                             [r["c"], r["a"], r["b"]], rtol=1e-6)
  same = {m: logits["a"] for m in "abc"}
  s = arl_jax.released_arl_coefficients(same, labels, 8.0)
  np.testing.assert_allclose(list(s.values()), [1 / 3] * 3, rtol=1e-6)


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

