"""What ``pip install .`` gives a user: the library only, core dependencies
only, typed, one version."""

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Imported by the runner and the data layer, never by the library itself
# (absl is not here: optax imports it).
NOT_CORE = ("orbax", "tqdm", "ml_collections", "tensorflow_datasets",
            "grain", "matplotlib", "tensorboardX", "scipy", "PIL", "torch",
            "experiments")


def test_library_imports_and_trains_without_the_extras():
  blocker = (
      "import sys, importlib.abc\n"
      "class Block(importlib.abc.MetaPathFinder):\n"
      "  def find_spec(self, name, path, target=None):\n"
      f"    if name.split('.')[0] in {NOT_CORE!r}:\n"
      "      raise ImportError(f'{name} is not a core dependency')\n"
      "sys.meta_path.insert(0, Block())\n"
      "import jax, jax.numpy as jnp, optax, arl_jax\n"
      "from arl_jax import models\n"
      "names = ('a', 'b')\n"
      "model = models.multiview_classifier({'a': 3, 'b': 4}, 2)\n"
      "x = {'a': jnp.ones((4, 3)), 'b': jnp.ones((4, 4))}\n"
      "params, ms = models.init_model(model, jax.random.PRNGKey(0), x)\n"
      "tx = arl_jax.with_modality_scales(optax.sgd(0.1),\n"
      "                                  arl_jax.label_modalities(names))\n"
      "state = arl_jax.TrainState.create(params=params, tx=tx,\n"
      "    model_state=ms, rng=jax.random.PRNGKey(1))\n"
      "step = arl_jax.make_train_step(models.make_apply_fn(model), tx,\n"
      "                               arl_jax.ARL())\n"
      "state, m = step(state, {'inputs': x, 'labels': jnp.array([0, 1, 0, 1])})\n"
      "print('ok', arl_jax.__version__, float(m['loss']) > 0)\n"
      f"loaded = [n for n in sys.modules if n.split('.')[0] in {NOT_CORE!r}]\n"
      "assert not loaded, loaded\n")
  out = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT / "tests",
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu",
                            "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split()[0] == "ok" and out.stdout.split()[2] == "True"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  # Built offline with this environment's setuptools (the SPDX license
  # field needs >= 77; `make` installs it).
  import setuptools
  if int(setuptools.__version__.split(".")[0]) < 77:
    pytest.fail(f"setuptools {setuptools.__version__} cannot build this "
                "pyproject (needs >= 77): pip install 'setuptools>=77'.")
  out = tmp_path_factory.mktemp("wheel")
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps",
       "--no-build-isolation", "--quiet", "--wheel-dir", str(out), str(ROOT)],
      capture_output=True, text=True, timeout=300)
  if proc.returncode != 0:
    pytest.fail(f"pip wheel failed: {proc.stderr[-2000:]}")
  (path,) = out.glob("arl_jax-*.whl")
  return zipfile.ZipFile(path)


def test_wheel_holds_the_library_only_with_its_marker_and_license(wheel):
  names = wheel.namelist()
  tops = {n.split("/")[0] for n in names}
  assert {t for t in tops if not t.endswith(".dist-info")} == {"arl_jax"}
  assert "arl_jax/py.typed" in names
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names


def test_wheel_metadata_core_dependencies_and_single_version(wheel):
  import arl_jax
  meta = next(n for n in wheel.namelist() if n.endswith("METADATA"))
  text = wheel.read(meta).decode()
  lines = text.splitlines()
  assert f"Version: {arl_jax.__version__}" in lines
  core = [l.split(":", 1)[1].strip() for l in lines
          if l.startswith("Requires-Dist:") and "extra ==" not in l]
  core_names = {c.split(">")[0].split("<")[0].split("=")[0].strip()
                for c in core}
  assert core_names == {"jax", "jaxlib", "flax", "optax", "numpy"}, core
  extras = [l for l in lines if l.startswith("Requires-Dist:")
            and 'extra == "experiments"' in l]
  for needed in ("orbax-checkpoint", "ml_collections", "absl-py", "tqdm",
                 "tensorboardX"):
    assert any(needed in l for l in extras), (needed, extras)
  assert "License-Expression: Apache-2.0" in lines
  # __version__ is written once: pyproject reads it.
  pyproject = (ROOT / "pyproject.toml").read_text()
  assert 'dynamic = ["version"]' in pyproject
  assert "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]
