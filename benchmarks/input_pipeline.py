"""Input pipeline samples/s: prepared (TFDS array_record + grain) vs decoding raw files.

Both read the same fake CREMA-D-shaped files (16 kHz WAV clips of about 2.5 s,
3 JPEG frames of 480x360 per clip, as the real data set has):

* ``raw``: what the reference data loader does for every sample, every epoch:
  read the WAV, resample to 22.05 kHz, fill 3 s, STFT (n_fft 512, hop 353),
  log; pick a frame, decode the JPEG, random resized crop to 224, flip,
  normalise; batch.
* ``prepared``: :func:`arl_jax.data.prepare` once (timed separately), then the
  grain training pipeline (:func:`arl_jax.data.av_batches`): read the stored
  spectrogram and the stored (shorter side 256) JPEG, crop, flip, normalise.

Both run in this one process (no worker processes), epochs of the same size,
median over epochs. Writes benchmarks/results/input_pipeline.{json,md}.

  python -m benchmarks.input_pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def raw_batches(root: pathlib.Path, clips, batch_size: int, seed: int):
  """The reference way: decode every sample from its files each time."""
  from PIL import Image

  from arl_jax.data import audio
  from arl_jax.data import av_pipeline
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(clips))
  for start in range(0, len(order) - batch_size + 1, batch_size):
    rows = []
    for i in order[start:start + batch_size]:
      clip, label = clips[i]
      spec = audio.wav_to_spectrogram(root / "AudioWAV" / f"{clip}.wav")
      frames = sorted((root / "Image-01-FPS" / clip).glob("*.jpg"))
      with Image.open(frames[int(rng.integers(len(frames)))]) as img:
        frame = av_pipeline.random_resized_crop(np.asarray(img.convert("RGB")),
                                                224, rng)
      if rng.random() < 0.5:
        frame = frame[:, ::-1]
      rows.append((spec, av_pipeline._normalise(frame[None]), label))
    yield {"inputs": {"audio": np.stack([r[0] for r in rows]),
                      "visual": np.stack([r[1] for r in rows])},
           "labels": np.array([r[2] for r in rows], np.int32)}


def time_epochs(make_iter, epochs):
  times, n = [], 0
  for e in range(epochs):
    start = time.perf_counter()
    n = sum(len(b["labels"]) for b in make_iter(e))
    times.append(time.perf_counter() - start)
  return n, times


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--actors", type=int, default=8)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--epochs", type=int, default=3)
  args = parser.parse_args(argv)

  tmp = pathlib.Path(tempfile.mkdtemp(prefix="arl_pipeline_"))
  os.environ["TMPDIR"] = str(tmp)
  from arl_jax import data
  from arl_jax.data import fixtures
  root = fixtures.write_fake_crema_d(
      tmp / "raw", actors=tuple(range(1001, 1001 + args.actors)),
      sentences=("DFA", "IEO"), seconds=2.5, frames=3, frame_size=(360, 480),
      test_fraction=0.2)
  clips = [tuple(l.split(",")) for l in (root / "train.csv").read_text().split()]
  labels = data.av_datasets.CREMA_D_CLASSES
  clips = [(c, labels.index(l)) for c, l in clips]

  start = time.perf_counter()
  builder = data.prepare("crema_d", root, tmp / "prepared")
  prepare_s = time.perf_counter() - start
  source = data.load_prepared(builder.data_dir)["train"]
  # The raw loader reads exactly the clips of the prepared training split.
  train_ids = {source[i]["clip_id"].decode() for i in range(len(source))}
  clips = [c for c in clips if c[0] in train_ids]
  n_raw, t_raw = time_epochs(
      lambda e: raw_batches(root, clips, args.batch_size, e), args.epochs)
  n_prep, t_prep = time_epochs(
      lambda e: data.av_batches(source, batch_size=args.batch_size, train=True,
                                epoch=e), args.epochs)
  raw_rate = n_raw / statistics.median(t_raw)
  prep_rate = n_prep / statistics.median(t_prep)
  import grain
  import tensorflow_datasets as tfds
  report = {
      "command": "python -m benchmarks.input_pipeline " + " ".join(
          argv if argv is not None else sys.argv[1:]),
      "machine": {"cpu": platform.processor() or platform.machine(),
                  "cores": os.cpu_count(), "python": platform.python_version()},
      "versions": {"tensorflow_datasets": tfds.__version__,
                   "grain": getattr(grain, "__version__", "?")},
      "clips_per_epoch": n_prep, "batch_size": args.batch_size,
      "epochs": args.epochs, "prepare_seconds": prepare_s,
      "raw_samples_per_s": raw_rate, "prepared_samples_per_s": prep_rate,
      "speedup": prep_rate / raw_rate, "raw_epoch_s": t_raw,
      "prepared_epoch_s": t_prep,
  }
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "input_pipeline.json").write_text(json.dumps(report, indent=1))
  md = (f"# Input pipeline (CREMA-D-shaped fake data)\n\n"
        f"- command: `{report['command']}`\n"
        f"- machine: {report['machine']}\n- versions: {report['versions']}\n"
        f"- {n_prep} training clips per epoch (3 frames of 480x360, 2.5 s "
        f"of 16 kHz audio each), batch {args.batch_size}, median of "
        f"{args.epochs} epochs, one process\n\n"
        "| pipeline | samples/s |\n|---|---|\n"
        f"| decode wav + jpg every sample (reference) | {raw_rate:,.1f} |\n"
        f"| prepared TFDS array_record + grain | {prep_rate:,.1f} |\n\n"
        f"Speed-up: **{report['speedup']:.1f}x**. One-off preparation: "
        f"{prepare_s:.1f} s.\n")
  (RESULTS / "input_pipeline.md").write_text(md)
  print(md)
  return report


if __name__ == "__main__":
  main()
