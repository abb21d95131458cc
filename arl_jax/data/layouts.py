"""What a local copy of CREMA-D, Kinetics-Sounds or AVE holds: the clip
lists, the classes and the folder layouts each builder checks
(:mod:`arl_jax.data.builders`), and :class:`DataError`, the error of bad
input data (also of damaged prepared files, :mod:`arl_jax.data.prepared`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
from collections.abc import Sequence

import numpy as np

from arl_jax.data import splits as splits_lib


class DataError(ValueError):
  """Bad input data; the message names the file and the problem."""


# The data sets :func:`prepare` builds (its ``name``; ``BUILDERS``' keys).
AV_DATA_SETS = ("crema_d", "kinetics_sounds", "ave")

CREMA_D_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
AVE_CLASSES = (
    "Church bell", "Male speech, man speaking", "Bark",
    "Fixed-wing aircraft, airplane", "Race car, auto racing",
    "Female speech, woman speaking", "Helicopter", "Violin, fiddle", "Flute",
    "Ukulele", "Frying (food)", "Truck", "Shofar", "Motorcycle",
    "Acoustic guitar", "Train horn", "Clock", "Banjo", "Goat",
    "Baby cry, infant cry", "Bus", "Chainsaw", "Cat", "Horse", "Toilet flush",
    "Rodents, rats", "Accordion", "Mandolin")


@dataclasses.dataclass(frozen=True)
class Clip:
  clip_id: str
  label: str
  audio: pathlib.Path
  frames: pathlib.Path
  group: str = ""          # e.g. CREMA-D actor, for group-disjoint splits
  listed: str = ""         # where the clip is listed: "<file>, line <n>"


def read_utf8(path: pathlib.Path) -> str:
  """A list file's text; :class:`DataError` if it is not UTF-8."""
  try:
    return path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"list file {path} is not UTF-8 text (byte {e.start}: "
                    f"{e.reason}); save it as UTF-8.") from None


def read_list(path: pathlib.Path) -> list[tuple[str, str, str]]:
  """``(clip, label, "<path>, line <n>")`` of each "clip,label" line."""
  if not path.is_file():
    raise DataError(f"split list {path} does not exist.")
  text = read_utf8(path)
  rows = []
  for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
    if not row or not row[0].strip():
      continue
    if len(row) < 2:
      raise DataError(f"{path}, line {n}: expected 'clip,label'; got {row}.")
    rows.append((row[0].strip(), row[1].strip(), f"{path}, line {n}"))
  if not rows:
    raise DataError(f"split list {path} lists no clip (expected 'clip,label' "
                    "lines).")
  return rows


def check_clip_lists(splits: dict) -> None:
  """Raises :class:`DataError` for a clip listed twice, in one split or in
  two (a leak between the splits: a clip trained on and tested on)."""
  seen: dict[str, tuple[str, str]] = {}
  for split, clips in splits.items():
    for c in clips:
      if c.clip_id in seen:
        where, first = seen[c.clip_id]
        what = ("listed twice" if where == split else
                f"in both the {where!r} and the {split!r} split (a leak: it "
                "would be trained on and tested on)")
        raise DataError(f"clip {c.clip_id!r} is {what}: {first} and "
                        f"{c.listed or split}. Each clip must be listed once.")
      seen[c.clip_id] = (split, c.listed or split)


def missing_entries(root: pathlib.Path, layout) -> list[str]:
  """The entries of ``layout`` (``name/`` a folder, else a file) not in root."""
  missing = []
  for name, _ in layout:
    path = root / name.rstrip("/")
    if not (path.is_dir() if name.endswith("/") else path.is_file()):
      missing.append(name)
  return missing


def layout_error(title: str, root: pathlib.Path, layout, missing) -> DataError:
  """The error for a folder without a data set's layout: what it needs."""
  need = "\n".join(f"  {name:<14} {what}" for name, what in layout)
  return DataError(
      f"data root {root} does not have the {title} layout: missing "
      f"{', '.join(missing)}. It must hold:\n{need}\n(the arl_jax README's "
      "layout table).")


def stratified_holdout(clips: Sequence[Clip], fraction: float, seed: int
                       ) -> tuple[list[Clip], list[Clip]]:
  """Splits ``clips`` into (rest, held out), ``fraction`` of each class held out.

  Every class with two or more clips is in both parts; each part is sorted
  by clip id (:func:`arl_jax.data.splits.stratified_split` of the clips in
  clip-id order).
  """
  clips = sorted(clips, key=lambda c: c.clip_id)
  held, rest = splits_lib.stratified_split(
      np.array([c.label for c in clips]), (fraction, 1 - fraction), seed,
      first_nonempty=True)
  return [clips[i] for i in rest], [clips[i] for i in held]
