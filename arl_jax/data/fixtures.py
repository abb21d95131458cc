"""Tiny fake copies of the audio-visual data sets, in their real layouts.

For tests, benchmarks and trying the pipeline without the real data: short
WAV files (16 kHz, 16-bit PCM, a class-dependent tone plus noise) and small
JPEG frames (a class-dependent colour plus noise).
"""

from __future__ import annotations

import pathlib

import numpy as np

from arl_jax.data.av_datasets import AVE_CLASSES
from arl_jax.data.av_datasets import CREMA_D_CLASSES


def write_wav(path: pathlib.Path, seconds: float, label: int, rng,
              rate: int = 16000) -> None:
  from scipy.io import wavfile
  t = np.arange(int(rate * seconds)) / rate
  x = 0.3 * np.sin(2 * np.pi * (200 + 100 * label) * t) + 0.05 * rng.normal(
      size=t.shape)
  path.parent.mkdir(parents=True, exist_ok=True)
  wavfile.write(path, rate, (np.clip(x, -1, 1) * 32767).astype(np.int16))


def write_frames(folder: pathlib.Path, count: int, label: int, rng,
                 size=(48, 64)) -> None:
  from PIL import Image
  folder.mkdir(parents=True, exist_ok=True)
  colour = np.array([(37 * label) % 256, (91 * label) % 256, (53 * label) % 256])
  for i in range(count):
    img = np.clip(colour + 30 * rng.normal(size=size + (3,)), 0, 255)
    Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}.jpg",
                                                quality=90)


def write_fake_crema_d(root, *, actors=(1001, 1002, 1003, 1004),
                       sentences=("DFA", "IEO"), seconds=1.2, frames=2,
                       frame_size=(48, 64), test_fraction=0.25, seed=0):
  """CREMA-D layout: AudioWAV/*.wav, Image-01-FPS/<clip>/*.jpg, train/test.csv."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  rows = []
  for actor in actors:
    for sentence in sentences:
      for k, emotion in enumerate(CREMA_D_CLASSES):
        clip = f"{actor}_{sentence}_{emotion}_XX"
        write_wav(root / "AudioWAV" / f"{clip}.wav", seconds, k, rng)
        write_frames(root / "Image-01-FPS" / clip, frames, k, rng, frame_size)
        rows.append((clip, emotion))
  order = rng.permutation(len(rows))
  n_test = int(round(test_fraction * len(rows)))
  test = sorted(rows[i] for i in order[:n_test])
  train = sorted(rows[i] for i in order[n_test:])
  (root / "train.csv").write_text("".join(f"{c},{l}\n" for c, l in train))
  (root / "test.csv").write_text("".join(f"{c},{l}\n" for c, l in test))
  return root


def write_fake_kinetics_sounds(root, *, classes=("playing drums", "singing",
                                                 "dog barking"),
                               per_class=(4, 2), seconds=1.0, frames=3, seed=0):
  """Kinetics-Sounds layout: audio/, frames/, classes.txt, train/test.csv."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  (root).mkdir(parents=True, exist_ok=True)
  (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
  for split, n in zip(("train", "test"), per_class):
    lines = []
    for k, c in enumerate(classes):
      for i in range(n):
        clip = f"{split}_{k}_{i}"
        write_wav(root / "audio" / f"{clip}.wav", seconds, k, rng)
        write_frames(root / "frames" / clip, frames, k, rng)
        lines.append(f"{clip},{c}\n")
    (root / f"{split}.csv").write_text("".join(lines))
  return root


def write_fake_ave(root, *, classes=AVE_CLASSES[:3], per_split=(4, 1, 2),
                   seconds=1.0, frames=3, seed=0):
  """AVE layout: audio/, frames/, trainSet.txt, valSet.txt, testSet.txt."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  for split, n in zip(("trainSet", "valSet", "testSet"), per_split):
    lines = ["Category&VideoID&Quality&StartTime&EndTime\n"]
    for c in classes:
      k = AVE_CLASSES.index(c)
      for i in range(n):
        vid = f"{split}{k:02d}{i}"
        write_wav(root / "audio" / f"{vid}.wav", seconds, k, rng)
        write_frames(root / "frames" / vid, frames, k, rng)
        lines.append(f"{c}&{vid}&good&0&10\n")
    (root / f"{split}.txt").write_text("".join(lines))
  return root
