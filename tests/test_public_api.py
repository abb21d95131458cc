"""The public surface: top-level names, public modules, and what is private."""

import importlib
import inspect
import pkgutil
import warnings

import numpy as np
import pytest

import arl_jax

PUBLIC_MODULES = ("coefficients", "data", "epoch_hooks", "estimators",
                  "fusion_weighting", "methods", "modality_values", "models",
                  "optimizer_checks", "parallel", "statistics", "step_parts")
# Thin namespaces: every name is re-exported from arl_jax._src.<module>.
NAMESPACES = ("coefficients", "epoch_hooks", "estimators", "fusion_weighting",
              "modality_values", "optimizer_checks", "parallel", "statistics",
              "step_parts")


def test_top_level_modules_are_the_public_ones_and_src():
  found = {m.name for m in pkgutil.iter_modules(arl_jax.__path__)}
  assert found == set(PUBLIC_MODULES) | {"_src"}


def test_every_top_level_name_resolves_once_and_is_documented():
  assert len(set(arl_jax.__all__)) == len(arl_jax.__all__)
  assert arl_jax.__all__ == sorted(arl_jax.__all__, key=str)
  for name in arl_jax.__all__:
    obj = getattr(arl_jax, name)
    assert inspect.getdoc(obj), f"arl_jax.{name} has no docstring"
  # One public form per coefficient rule: the logits-level function.
  assert not [n for n in arl_jax.__all__ if n.endswith("_from_statistics")]
  for module in PUBLIC_MODULES:     # arl_jax.data is imported on demand
    assert inspect.getdoc(importlib.import_module(f"arl_jax.{module}"))


@pytest.mark.parametrize("module", NAMESPACES)
def test_namespaces_reexport_the_implementation(module):
  public = importlib.import_module(f"arl_jax.{module}")
  private = importlib.import_module(f"arl_jax._src.{module}")
  assert inspect.getdoc(public)
  assert public.__all__, module
  for name in public.__all__:
    assert getattr(public, name) is getattr(private, name), (module, name)
    obj = getattr(public, name)
    if callable(obj):
      assert inspect.getdoc(obj), f"arl_jax.{module}.{name} has no docstring"


@pytest.mark.parametrize("name", sorted(arl_jax._MOVED))
def test_moved_names_still_read_with_a_warning(name):
  module, _ = arl_jax._MOVED[name]
  with pytest.warns(DeprecationWarning, match=f"arl_jax.{name} is deprecated"):
    obj = getattr(arl_jax, name)
  assert obj is getattr(importlib.import_module(module), name)
  assert name not in arl_jax.__all__


def test_unknown_names_raise_attribute_error():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
      arl_jax.no_such_name  # noqa: B018


def test_the_src_modules_are_not_reexported_as_modules():
  for name in ("losses", "unimodal", "labels", "transforms", "train_step"):
    with pytest.raises(ImportError):
      importlib.import_module(f"arl_jax.{name}")


def test_register_method_replaces_a_rerun_definition_and_refuses_clashes():
  import dataclasses
  from typing import ClassVar

  from arl_jax._src import method_protocol as base

  def define(doc):
    @dataclasses.dataclass(frozen=True)
    class Mine(arl_jax.Method):
      __doc__ = doc
      name: ClassVar[str] = "mine_for_test"
    return Mine

  try:
    first = arl_jax.register_method(define("first"))
    again = arl_jax.register_method(define("again"))   # a cell run twice
    assert again is not first
    assert arl_jax.methods.method_class("mine_for_test") is again

    @dataclasses.dataclass(frozen=True)
    class Other(arl_jax.Method):
      name: ClassVar[str] = "mine_for_test"

    with pytest.raises(ValueError, match="already registered .*replace=True"):
      arl_jax.register_method(Other)
    assert arl_jax.register_method(replace=True)(Other) is Other
    assert arl_jax.methods.method_class("mine_for_test") is Other
  finally:
    base._REGISTRY.pop("mine_for_test", None)


def test_a_custom_rule_from_statistics_as_documented(monkeypatch):
  # The example of arl_jax.coefficients' docstring, run as written (the
  # method it registers leaves the registry with the test).
  import jax.numpy as jnp

  from arl_jax._src import method_protocol
  monkeypatch.setattr(method_protocol, "_REGISTRY",
                      dict(method_protocol._REGISTRY))
  doc = inspect.getdoc(arl_jax.coefficients)
  lines = []
  for line in doc.split("::\n", 1)[1].splitlines():
    if line.strip() and not line.startswith("    "):
      break
    lines.append(line[4:])
  code = "\n".join(lines)
  namespace = {}
  exec(compile(code, "arl_jax.coefficients", "exec"), namespace)
  method = arl_jax.make_method("arl_squared_q", temperature=4.0)
  rng = np.random.default_rng(0)
  z = {m: jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
       for m in ("audio", "visual")}
  y = jnp.asarray(rng.integers(0, 3, 16))
  stats = arl_jax.modality_statistics(z, y)
  out = method.modulation(stats)
  q = arl_jax.statistics.inverse_variance_from_statistics(stats)
  want = arl_jax.coefficients.arl_coefficients_from_statistics(
      stats, 4.0, inverse_variance={m: v ** 2 for m, v in q.items()})
  for m in z:
    np.testing.assert_allclose(out.coefficients[m], want[m], rtol=1e-6)
    np.testing.assert_allclose(out.scales[m], 1.0 + want[m], rtol=1e-6)
  assert not np.allclose(
      [float(out.coefficients[m]) for m in z],
      [float(v) for v in arl_jax.arl_coefficients(z, y, 4.0).values()])


def test_the_core_imports_nothing_above_it():
  """``arl_jax/_src`` is the core: as optax keeps its protocol in
  ``optax._src.base``, no module there imports a public module above it
  (``arl_jax.methods``, ``arl_jax.models``, ...), which import it."""
  import ast
  import pathlib
  src = pathlib.Path(arl_jax.__file__).parent / "_src"
  offenders = []
  for path in sorted(src.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom)
               else [])
      offenders += [f"{path.name}: {n}" for n in names
                    if n.startswith("arl_jax") and not (
                        n == "arl_jax._src" or n.startswith("arl_jax._src."))]
  assert not offenders, offenders
