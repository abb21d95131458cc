import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arl_jax

Z = np.zeros((4, 3), np.float32)
Y = np.array([0, 1, 2, 0], np.int32)


@pytest.mark.parametrize("call,match", [
    (lambda: arl_jax.arl_coefficients({"a": Z}, Y, 1.0), "at least two"),
    (lambda: arl_jax.arl_coefficients([Z, Z], Y, 1.0), "mapping"),
    (lambda: arl_jax.arl_coefficients({"a": Z, "b": Z[0]}, Y, 1.0),
     r"modality 'b' must have shape \[batch, classes\]"),
    (lambda: arl_jax.arl_coefficients({"a": Z, "b": np.zeros((4, 5))}, Y, 1.0),
     "same batch and class count"),
    (lambda: arl_jax.arl_coefficients({"a": Z, "b": Z}, Y[:3], 1.0),
     r"labels must have shape \[batch\]"),
    (lambda: arl_jax.arl_coefficients({"a": Z, "b": Z}, Y.astype(float), 1.0),
     "integer"),
    (lambda: arl_jax.arl_coefficients({"a": Z, "b": Z}, Y + 1, 1.0),
     r"lie in \[0, 3\)"),
    (lambda: arl_jax.arl_coefficients({"a": Z, "b": Z}, Y, 0.0),
     "temperature must be > 0"),
    (lambda: arl_jax.arl_coefficients({"a": Z, "b": Z}, Y, -2.0),
     "temperature must be > 0"),
    (lambda: arl_jax.ARL(temperature=0.0), "temperature must be > 0"),
    (lambda: arl_jax.arl_loss(Z, {"a": Z, "b": Z}, np.zeros((4, 1), int), 1.0),
     "labels must have shape"),
    (lambda: arl_jax.arl_loss(np.zeros((4, 2)), {"a": Z, "b": Z}, Y, 1.0),
     "fused_logits have shape"),
    (lambda: arl_jax.make_method("arll"), "unknown method 'arll'"),
    (lambda: arl_jax.make_method("arl", temprature=4), "no field"),
])
def test_bad_input_is_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_checks_work_under_jit_and_name_the_problem():
  f = jax.jit(lambda z, y: arl_jax.arl_coefficients(z, y, 2.0))
  with pytest.raises(ValueError, match="same batch and class count"):
    f({"a": Z, "b": np.zeros((4, 2), np.float32)}, Y)
  # Under jit label values are not checked (they are traced), shapes are.
  out = f({"a": jnp.asarray(Z), "b": jnp.asarray(Z)}, jnp.asarray(Y))
  assert set(out) == {"a", "b"}
