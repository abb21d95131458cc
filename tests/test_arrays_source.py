"""A user's own arrays as a data source: the file, the runner, the comparison."""

import json

import numpy as np
import pytest
from test_runner import tiny_synthetic

from arl_jax.data import arrays
from experiments import compare
from experiments import train


def _splits(rows=(96, 32, 32), seed=0, classes=3):
  rng = np.random.default_rng(seed)
  out, groups = {}, {}
  for split, n in zip(arrays.SPLITS, rows):
    y = rng.integers(0, classes, n).astype(np.int32)
    x = {"audio": (rng.normal(size=(n, 6)) + y[:, None]).astype(np.float32),
         "visual": rng.normal(size=(n, 4)).astype(np.float32)}
    out[split] = (x, y)
    groups[split] = np.array([f"{split}-speaker{i % 4}" for i in range(n)])
  return out, groups


def test_save_and_load_round_trip(tmp_path):
  splits, groups = _splits()
  path = arrays.save_arrays(tmp_path / "mine.npz", splits, groups=groups)
  problem = arrays.load_arrays(path)
  assert problem.num_classes == 3 and problem.modalities == ("audio", "visual")
  for s in arrays.SPLITS:
    for m in ("audio", "visual"):
      np.testing.assert_array_equal(problem.splits[s][0][m], splits[s][0][m])
    np.testing.assert_array_equal(problem.splits[s][1], splits[s][1])
    np.testing.assert_array_equal(problem.groups[s], groups[s])
  assert len(problem.sha256) == 64
  assert arrays.file_modalities(path) == ["audio", "visual"]
  # Without groups, and with more classes than the labels show.
  arrays.save_arrays(tmp_path / "plain.npz", splits, num_classes=5)
  plain = arrays.load_arrays(tmp_path / "plain.npz")
  assert plain.groups is None and plain.num_classes == 5


def _broken(kind):
  splits, groups = _splits()
  x, y = splits["validation"]
  if kind == "split":
    del splits["test"]
  elif kind == "modalities":
    splits["validation"] = ({"audio": x["audio"], "depth": x["visual"]}, y)
  elif kind == "rows":
    splits["validation"] = ({**x, "audio": x["audio"][:-1]}, y)
  elif kind == "labels":
    splits["validation"] = (x, y.astype(np.float32))
  elif kind == "range":
    splits["validation"] = (x, np.where(y == 0, -1, y))
  elif kind == "nan":
    audio = x["audio"].copy()
    audio[[3, 7]] = np.nan
    splits["validation"] = ({**x, "audio": audio}, y)
  elif kind == "groups":
    groups["train"] = groups["train"][:-2]
  elif kind == "width":
    splits["test"] = ({**splits["test"][0], "visual": np.zeros((32, 5))},
                      splits["test"][1])
  return splits, groups


@pytest.mark.parametrize("kind,match", [
    ("split", r"lack the split\(s\) \['test'\]"),
    ("modalities", r"split 'validation' has modalities \['audio', 'depth'\]"),
    ("rows", r"split 'validation', modality 'audio': \(31,\) rows for 32"),
    ("labels", "labels must be a 1-D integer array"),
    ("range", "labels must be >= 0"),
    ("nan", r"modality 'audio': 2 row\(s\) hold NaN or Inf \(first: row 3\)"),
    ("groups", "split 'train': 94 groups for 96 rows"),
    ("width", r"rows of shape \(5,\), the training split's \(4,\)"),
])
def test_bad_arrays_are_named_and_nothing_is_written(tmp_path, kind, match):
  splits, groups = _broken(kind)
  with pytest.raises(ValueError, match=match):
    arrays.save_arrays(tmp_path / "bad.npz", splits, groups=groups)
  assert not (tmp_path / "bad.npz").exists()


def test_missing_and_damaged_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no arrays file at"):
    arrays.load_arrays(tmp_path / "none.npz")
  path = arrays.save_arrays(tmp_path / "mine.npz", _splits()[0])
  (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:300])
  with pytest.raises(ValueError, match="cut.npz is not a readable .npz"):
    arrays.load_arrays(tmp_path / "cut.npz")
  np.savez(tmp_path / "other.npz", a=np.zeros(3))
  with pytest.raises(ValueError, match="has no train.labels"):
    arrays.load_arrays(tmp_path / "other.npz")
  with pytest.raises(ValueError, match="labels go up to 2, outside"):
    arrays.save_arrays(tmp_path / "few.npz", _splits()[0], num_classes=2)


def _arrays_config(path, **overrides):
  c = tiny_synthetic(epochs=2, **overrides)
  c.data.source, c.data.path = "arrays", str(path)
  c.data.heldout_fraction = 0.25
  return c


def test_runner_trains_on_a_users_arrays_with_whole_groups_held_out(tmp_path):
  splits, groups = _splits()
  path = arrays.save_arrays(tmp_path / "mine.npz", splits, groups=groups)
  c = _arrays_config(path, **{"method.name": "arl",
                              "method.estimator": "heldout_error"})
  c.data.heldout_by_group = True
  report = train.train_and_evaluate(c, tmp_path / "run")
  assert np.isfinite(report["test_accuracy_at_best_val"])
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["data"]["source"] == "arrays"
  history = [json.loads(line) for line in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert len(history) == 2 and history[0]["test_count"] == 32
  # Groups without the file's groups, and a missing file, are refused first.
  arrays.save_arrays(tmp_path / "plain.npz", splits)
  c = _arrays_config(tmp_path / "plain.npz")
  c.data.heldout_by_group = True
  with pytest.raises(train.ConfigError, match="has none: save it with"):
    train.validate_config(c)
  with pytest.raises(train.ConfigError, match="must name the arrays file"):
    train.validate_config(_arrays_config(tmp_path / "none.npz"))
  (tmp_path / "junk.npz").write_text("junk")
  with pytest.raises(train.ConfigError, match="is not a readable .npz"):
    train.validate_config(_arrays_config(tmp_path / "junk.npz"))


def test_the_comparison_takes_a_users_problem(tmp_path, monkeypatch):
  splits, groups = _splits()
  path = arrays.save_arrays(tmp_path / "mine.npz", splits, groups=groups)
  monkeypatch.setenv(compare.USER_ARRAYS_ENV, f"mine={path}")
  rows = compare.runs("imbalance")["mine"]
  assert {"audio alone", "visual alone", "concat", "UR", "G-Blending",
          "MLA", "PMR"} <= set(rows)
  c = compare._config("imbalance", "mine", rows["ARL (held-out error)"], 0,
                      tmp_path)
  assert c.data.source == "arrays" and c.data.heldout_by_group
  train.validate_config(c)
  monkeypatch.delenv(compare.USER_ARRAYS_ENV)
  with pytest.raises(SystemExit):
    compare.main(["--arrays", "memorise_vs_parity=" + str(path)])
  with pytest.raises(SystemExit):
    compare.main(["--arrays", "bad=" + str(tmp_path / "none.npz")])


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
  import pathlib
  import re
  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md"
          ).read_text()
  section = text.split("### Your own data", 1)[1]
  block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
  monkeypatch.chdir(tmp_path)
  exec(compile(block, "README.md (Your own data)", "exec"), {})
  problem = arrays.load_arrays(tmp_path / "mine.npz")
  assert problem.groups is not None and problem.num_classes == 3
  c = _arrays_config(tmp_path / "mine.npz")
  c.data.heldout_by_group = True
  train.validate_config(c)
