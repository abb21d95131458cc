"""Tiny fake copies of the audio-visual data sets, in their real layouts.

For the tests and the benchmarks, and for trying the pipeline without the
real data (not installed with arl_jax: from a clone, ``from benchmarks
import fake_data``): short WAV files (16 kHz, 16-bit PCM, a class-dependent
tone plus noise) and small JPEG frames: ``style="noise"`` (a class-dependent
colour plus strong pixel noise: the worst case for JPEG, ~5x the bytes of a
real frame) or ``style="scene"`` (a smooth background, a face-like shape
whose mouth depends on the class, light blur and sensor-like noise:
compresses like a real video frame, ~20 KB at 480x360).
"""

from __future__ import annotations

import pathlib

import numpy as np

from arl_jax.data.layouts import AVE_CLASSES
from arl_jax.data.layouts import CREMA_D_CLASSES


def write_wav(path: pathlib.Path, seconds: float, label: int, rng,
              rate: int = 16000) -> None:
  from scipy.io import wavfile
  t = np.arange(int(rate * seconds)) / rate
  x = 0.3 * np.sin(2 * np.pi * (200 + 100 * label) * t) + 0.05 * rng.normal(
      size=t.shape)
  path.parent.mkdir(parents=True, exist_ok=True)
  wavfile.write(path, rate, (np.clip(x, -1, 1) * 32767).astype(np.int16))


def _scene(size, label: int, rng) -> np.ndarray:
  from PIL import Image
  from PIL import ImageDraw
  from PIL import ImageFilter
  h, w = size
  yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
  background = np.stack([60 + 40 * yy, 80 + 30 * xx, 100 + 20 * (xx + yy)], -1)
  img = Image.fromarray(background.astype(np.uint8))
  draw = ImageDraw.Draw(img)
  cx = w / 2 + rng.uniform(-0.08, 0.08) * w
  cy = h / 2 + rng.uniform(-0.05, 0.05) * h
  rx, ry = 0.17 * w, 0.3 * h
  draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=(200, 160, 140))
  for side in (-1, 1):
    ex = cx + side * 0.4 * rx
    draw.ellipse([ex - 0.1 * rx, cy - 0.3 * ry, ex + 0.1 * rx, cy - 0.2 * ry],
                 fill=(40, 40, 40))
  mouth = 0.03 * ry * (1 + label)
  draw.rectangle([cx - 0.35 * rx, cy + 0.4 * ry, cx + 0.35 * rx,
                  cy + 0.4 * ry + mouth], fill=(120, 40, 40))
  draw.rectangle([0, 0.8 * h, w, h], fill=(30, 50, 90))
  img = img.filter(ImageFilter.GaussianBlur(max(0.5, h / 240)))
  noisy = np.asarray(img, np.float32) + 3 * rng.normal(size=(h, w, 3))
  return np.clip(noisy, 0, 255)


def write_frames(folder: pathlib.Path, count: int, label: int, rng,
                 size=(48, 64), style: str = "noise") -> None:
  from PIL import Image
  if style not in ("noise", "scene"):
    raise ValueError(f"style must be 'noise' or 'scene'; got {style!r}.")
  folder.mkdir(parents=True, exist_ok=True)
  colour = np.array([(37 * label) % 256, (91 * label) % 256, (53 * label) % 256])
  for i in range(count):
    if style == "scene":
      img = _scene(size, label, rng)
    else:
      img = np.clip(colour + 30 * rng.normal(size=size + (3,)), 0, 255)
    Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}.jpg",
                                                quality=90)


def write_fake_crema_d(root, *, actors=(1001, 1002, 1003, 1004),
                       sentences=("DFA", "IEO"), seconds=1.2, frames=2,
                       frame_size=(48, 64), test_fraction=0.25, seed=0,
                       frame_style: str = "noise"):
  """CREMA-D layout: AudioWAV/*.wav, Image-01-FPS/<clip>/*.jpg, train/test.csv."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  rows = []
  for actor in actors:
    for sentence in sentences:
      for k, emotion in enumerate(CREMA_D_CLASSES):
        clip = f"{actor}_{sentence}_{emotion}_XX"
        write_wav(root / "AudioWAV" / f"{clip}.wav", seconds, k, rng)
        write_frames(root / "Image-01-FPS" / clip, frames, k, rng, frame_size,
                     frame_style)
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
