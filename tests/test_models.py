import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arl_jax
from arl_jax import models


def n_params(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("channels,expected", [(3, 11_176_512), (1, 11_170_240)])
def test_resnet18_trunk_parameter_count(channels, expected):
  variables = jax.eval_shape(lambda: models.ResNet18().init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, channels))))
  assert n_params(variables["params"]) == expected


def test_crema_d_model_shapes_and_parameter_tree():
  model = models.audio_visual_classifier(6)
  x = {"audio": jnp.zeros((2, 257, 188)), "visual": jnp.zeros((2, 1, 224, 224, 3))}
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  params = variables["params"]
  assert set(params) == {"audio", "visual", "head"}
  assert n_params(params["audio"]) == 11_170_240
  assert n_params(params["visual"]) == 11_176_512
  assert n_params(params["head"]) == 1024 * 6 + 6
  out = jax.eval_shape(model.apply, variables, x)
  fused, uni = out
  assert fused.shape == (2, 6) and {m: u.shape for m, u in uni.items()} == {
      "audio": (2, 6), "visual": (2, 6)}
  # Kinetics-Sounds / AVE shapes: 3 frames, 257x1004 spectrogram.
  ks = models.audio_visual_classifier(34, audio_shape=(257, 1004), num_frames=3)
  x = {"audio": jnp.zeros((1, 257, 1004)), "visual": jnp.zeros((1, 3, 224, 224, 3))}
  variables = jax.eval_shape(lambda: ks.init(jax.random.PRNGKey(0), x))
  assert jax.eval_shape(ks.apply, variables, x)[0].shape == (1, 34)


@pytest.mark.parametrize("shape,match", [
    ({"audio": (2, 257, 190), "visual": (2, 1, 224, 224, 3)},
     r"modality 'audio' has shape \(2, 257, 190\).*\[batch, 257, 188\]"),
    ({"audio": (2, 257, 188), "visual": (2, 1, 224, 224, 1)},
     r"modality 'visual'.*\[batch, 1, 224, 224, 3\]"),
    ({"audio": (2, 257, 188), "visual": (3, 1, 224, 224, 3)}, "batch size"),
    ({"audio": (2, 257, 188)}, "missing"),
])
def test_wrong_input_shapes_fail_before_compilation(shape, match):
  model = models.audio_visual_classifier(6)
  x = {m: jax.ShapeDtypeStruct(s, jnp.float32) for m, s in shape.items()}
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


@pytest.mark.parametrize("fusion", ["concat", "sum", "shared", "gated", "film"])
@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_unimodal_logits_are_the_head_on_zeroed_features(fusion, names):
  dims = {m: 3 + i for i, m in enumerate(names)}
  kwargs = {} if fusion in ("concat", "sum", "shared") else {"hidden": 8}
  model = models.multiview_classifier(dims, 5, encoder_widths=(7,), fusion=fusion,
                                      **kwargs)
  rng = np.random.default_rng(0)
  x = {m: rng.normal(size=(4, d)).astype(np.float32) for m, d in dims.items()}
  params, _ = models.init_model(model, jax.random.PRNGKey(1), x)
  fused, uni = model.apply({"params": params}, x)
  feats = {m: models.MLPEncoder((7,)).apply({"params": params[m]}, x[m])
           for m in names}
  head = model.head
  np.testing.assert_allclose(
      fused, head.apply({"params": params["head"]}, feats), rtol=1e-5)
  for m in names:
    zeroed = {k: v if k == m else jnp.zeros_like(v) for k, v in feats.items()}
    np.testing.assert_allclose(
        uni[m], head.apply({"params": params["head"]}, zeroed), rtol=1e-5,
        atol=1e-6)
    assert not np.allclose(uni[m], fused)
  assert set(params) == set(names) | {"head"}


def _head_blocks(fusion, params, widths):
  """float64 ``({m: W_m}, b)`` of an additive head, read from its parameters."""
  names = list(widths)
  if fusion == "concat":
    kernel = np.asarray(params["classifier"]["kernel"], np.float64)
    starts = np.cumsum([0] + [widths[m] for m in names])
    blocks = {m: kernel[starts[i]:starts[i + 1]] for i, m in enumerate(names)}
    return blocks, np.asarray(params["classifier"]["bias"], np.float64)
  if fusion == "sum":
    return ({m: np.asarray(params[f"{m}_classifier"]["kernel"], np.float64)
             for m in names}, np.asarray(params["bias"], np.float64))
  kernel = np.asarray(params["classifier"]["kernel"], np.float64)
  return ({m: kernel for m in names},
          np.asarray(params["classifier"]["bias"], np.float64))


@pytest.mark.parametrize("fusion", ["concat", "sum", "shared"])
@pytest.mark.parametrize("widths", [
    {"a": 5, "b": 5}, {"a": 5, "b": 5, "c": 5},           # one batched matmul
    {"b": 3, "a": 6}, {"a": 4, "c": 7, "b": 2}])           # one per modality
def test_partial_sum_path_equals_stacked_path_and_numpy(fusion, widths):
  if fusion == "shared" and len(set(widths.values())) > 1:
    pytest.skip("the shared head needs equal widths (tested below)")
  names = tuple(widths)
  head = models.make_fusion(fusion, 4, names)
  rng = np.random.default_rng(len(names))
  feats = {m: rng.normal(size=(6, w)).astype(np.float32)
           for m, w in widths.items()}
  variables = head.init(jax.random.PRNGKey(0), feats)
  # Non-zero bias, so that the bias's place in each unimodal logit is tested.
  variables = jax.tree.map(
      lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32),
      variables)
  bound = head.bind(variables)
  assert hasattr(bound, "partial_logits")
  fused, uni = arl_jax.fused_and_unimodal_logits(bound, feats)
  # The generic path: a closure (no partial_logits), K + 1 stacked row blocks.
  g_fused, g_uni = arl_jax.fused_and_unimodal_logits(
      lambda f: head.apply(variables, f), feats)
  np.testing.assert_allclose(fused, g_fused, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fused, head.apply(variables, feats), rtol=1e-5,
                             atol=1e-5)
  blocks, bias = _head_blocks(fusion, variables["params"], widths)
  z = {m: feats[m].astype(np.float64) for m in names}
  want = {m: z[m] @ blocks[m] + bias for m in names}
  np.testing.assert_allclose(fused, sum(z[m] @ blocks[m] for m in names) + bias,
                             rtol=1e-5, atol=1e-5)
  assert set(uni) == set(names)
  for m in names:
    np.testing.assert_allclose(uni[m], g_uni[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(uni[m], want[m], rtol=1e-5, atol=1e-5)
  # Jitted, inside a model (init included): the same numbers.
  model = models.multiview_classifier(
      {m: 3 for m in names}, 4, encoder_widths=(5,), fusion=fusion)
  x = {m: rng.normal(size=(6, 3)).astype(np.float32) for m in names}
  params, _ = models.init_model(model, jax.random.PRNGKey(1), x)
  j_fused, j_uni = jax.jit(lambda p, x: model.apply({"params": p}, x))(params,
                                                                        x)
  enc = {m: models.MLPEncoder((5,)).apply({"params": params[m]}, x[m])
         for m in names}
  h_fused, h_uni = arl_jax.fused_and_unimodal_logits(
      lambda f: model.head.apply({"params": params["head"]}, f), enc)
  np.testing.assert_allclose(j_fused, h_fused, rtol=1e-5, atol=1e-5)
  for m in names:
    np.testing.assert_allclose(j_uni[m], h_uni[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "sum", "shared"])
@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_partial_sum_path_keeps_nan_in_its_modality(fusion, names):
  head = models.make_fusion(fusion, 3, names)
  feats = {m: jnp.ones((2, 4)) * (i + 1) for i, m in enumerate(names)}
  variables = head.init(jax.random.PRNGKey(0), feats)
  feats = dict(feats, a=jnp.full((2, 4), jnp.nan))
  fused, uni = jax.jit(lambda f: arl_jax.fused_and_unimodal_logits(
      head.bind(variables), f))(feats)
  assert np.all(np.isnan(uni["a"])) and np.all(np.isnan(fused))
  for m in names[1:]:
    assert np.all(np.isfinite(uni[m])), m


def test_shared_head_is_one_classifier_and_needs_equal_widths():
  names = ("audio", "text", "visual")
  head = models.make_fusion("shared", 5, names)
  assert isinstance(head, models.fusion.SharedFusion)
  feats = {m: jnp.ones((2, 8)) for m in names}
  params = head.init(jax.random.PRNGKey(0), feats)["params"]
  assert jax.tree.map(jnp.shape, params) == {
      "classifier": {"kernel": (8, 5), "bias": (5,)}}
  bad = dict(feats, text=jnp.ones((2, 6)))
  match = r"'audio': 8, 'text': 6, 'visual': 8"
  with pytest.raises(ValueError, match=match):
    head.init(jax.random.PRNGKey(0), bad)
  with pytest.raises(ValueError, match=match):
    arl_jax.fused_and_unimodal_logits(head.bind({"params": params}), bad)
  model = models.multiview_classifier({"a": 3, "b": 4}, 5,
                                      encoder_widths=(6,), fusion="shared")
  assert isinstance(model.head, models.fusion.SharedFusion)


def _small_av_model(dtype):
  return models.audio_visual_classifier(4, audio_shape=(33, 20), num_frames=2,
                                        image_size=32, dtype=dtype)


def _small_av_batch(batch=4, seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": {"audio": rng.normal(size=(batch, 33, 20)).astype(np.float32),
                     "visual": rng.normal(size=(batch, 2, 32, 32, 3))
                     .astype(np.float32)},
          "labels": rng.integers(0, 4, batch).astype(np.int32)}


@pytest.fixture(scope="module")
def trained_pair():
  """One bf16 and one fp32 ARL step of a small ResNet18 audio-visual model."""
  out = {}
  batch = _small_av_batch()
  for dtype in (jnp.float32, jnp.bfloat16):
    model = _small_av_model(dtype)
    params, model_state = models.init_model(model, jax.random.PRNGKey(0),
                                            batch["inputs"])
    labels = functools.partial(models.modality_labels,
                               modalities=("audio", "visual"))
    tx = optax.chain(arl_jax.scale_by_modality(labels),
                     optax.clip_by_global_norm(40.0), optax.sgd(0.01, 0.9))
    state = arl_jax.TrainState.create(params=params, tx=tx,
                                      model_state=model_state,
                                      rng=jax.random.PRNGKey(1))
    step = jax.jit(arl_jax.make_train_step(models.make_apply_fn(model), tx,
                                           arl_jax.ARL(temperature=8.0)))
    new_state, metrics = step(state, batch)
    out[jnp.dtype(dtype).name] = (model, state, new_state, metrics)
  return out


def test_bf16_step_is_finite_and_keeps_fp32_parameters(trained_pair):
  model, state, new_state, metrics = trained_pair["bfloat16"]
  assert np.isfinite(float(metrics["loss"]))
  assert all(np.isfinite(float(v)) for v in metrics["a"].values())
  for leaf in jax.tree.leaves(new_state.params):
    assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
  _, _, _, fp32 = trained_pair["float32"]
  # Same initial parameters and batch: bf16 loss close to fp32 loss.
  assert float(metrics["loss"]) == pytest.approx(float(fp32["loss"]), rel=0.05)


def test_batchnorm_statistics_train_vs_eval(trained_pair):
  model, state, new_state, _ = trained_pair["float32"]
  before = state.model_state["batch_stats"]
  after = new_state.model_state["batch_stats"]
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, after)
  assert all(jax.tree.leaves(changed))           # every running stat moved
  apply_fn = jax.jit(models.make_apply_fn(model), static_argnames=("train",))
  batch = _small_av_batch(4, seed=1)
  (fused, _), kept = apply_fn(new_state.params, new_state.model_state,
                              batch["inputs"], train=False, rng=None)
  jax.tree.map(np.testing.assert_array_equal, kept,
               new_state.model_state)         # eval leaves state untouched
  # Eval uses running statistics: a row's output does not depend on the batch.
  single = jax.tree.map(lambda x: x[:1], batch["inputs"])
  (fused1, _), _ = apply_fn(new_state.params, new_state.model_state, single,
                            train=False, rng=None)
  np.testing.assert_allclose(fused1, fused[:1], rtol=1e-4, atol=1e-5)
  # Train mode uses batch statistics: it does.
  (t_all, _), _ = apply_fn(new_state.params, new_state.model_state,
                           batch["inputs"], train=True, rng=None)
  (t_one, _), _ = apply_fn(new_state.params, new_state.model_state,
                           jax.tree.map(lambda x: x[:2], batch["inputs"]),
                           train=True, rng=None)
  assert not np.allclose(t_one[:1], t_all[:1], atol=1e-4)
