"""Input pipeline samples/s: prepared (TFDS array_record + grain) vs decoding raw files.

All pipelines read the same fake CREMA-D-shaped files (16 kHz WAV clips of
2.5 s, 3 JPEG frames of 480x360 per clip, as the real data set has), written
twice: ``scene`` frames (smooth, face-like, ~20 KB: compress like real video
frames) and ``noise`` frames (strong pixel noise, ~100 KB: the worst case for
JPEG decoding).

* ``raw``: what the reference data loader does for every sample, every epoch:
  read the WAV, resample to 22.05 kHz (scipy's polyphase filter, the function
  ``prepare`` uses; librosa's default soxr "HQ" resampler would take ~1.5 ms
  less per clip here, its older resampy default several ms more), fill 3 s,
  STFT (n_fft 512, hop 353), log; pick a frame, decode the JPEG (PIL), random
  resized crop to 224 (PIL, as torchvision does), flip, normalise to float32;
  batch.
* ``prepared, host augmentation``: :func:`arl_jax.data.prepare` once (timed
  separately), then ``av_batches(..., augment="host")``: read the stored
  spectrogram and the stored (shorter side 256) JPEG, decode, crop/resize,
  flip; uint8 frames (normalised by the model on the device).
* ``prepared, device augmentation``: ``av_batches(..., augment="device")``:
  read, decode into the batch's uint8 canvas; the crop, flip and resize run
  in the jitted step (:class:`arl_jax.data.FrameAugmentation`), so they are
  not in this figure. Their device cost is timed on its own
  (``--device-batch``, jitted, on whatever backend JAX has here: on a CPU
  this is not where it is meant to run).

All in this one process (no worker processes), the same clips per epoch,
pipelines interleaved epoch by epoch (round robin), median over epochs.
Writes benchmarks/results/input_pipeline.{json,md}.

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
PIPELINES = ("raw", "host", "device")
LABELS = {"raw": "decode wav + jpg every sample (reference)",
          "host": "prepared, host augmentation (`augment=\"host\"`)",
          "device": "prepared, device augmentation (`augment=\"device\"`), host part"}


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
        frame = av_pipeline.random_resized_crop(img.convert("RGB"), 224, rng)
      if rng.random() < 0.5:
        frame = frame[:, ::-1]
      rows.append((spec, av_pipeline._normalise(frame[None]), label))
    yield {"inputs": {"audio": np.stack([r[0] for r in rows]),
                      "visual": np.stack([r[1] for r in rows])},
           "labels": np.array([r[2] for r in rows], np.int32)}


def device_augment_ms(source, batch_size: int, repeats: int = 10) -> dict:
  """Median ms of the jitted FrameAugmentation.train on one batch."""
  import jax

  from arl_jax import data
  batch = next(data.av_batches(source, batch_size=batch_size, train=True,
                               augment="device"))
  aug = jax.jit(data.FrameAugmentation(224).train)
  key = jax.random.key(0)
  start = time.perf_counter()
  jax.block_until_ready(aug(batch, key))
  compile_s = time.perf_counter() - start
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(aug(batch, jax.random.fold_in(key, i)))
    times.append(time.perf_counter() - start)
  return {"backend": jax.default_backend(), "batch": batch_size,
          "canvas": list(batch["inputs"]["visual"].shape[2:4]),
          "ms_per_batch": 1e3 * statistics.median(times),
          "compile_s": compile_s}


def run_style(tmp: pathlib.Path, style: str, args) -> dict:
  from arl_jax import data
  from benchmarks import fake_data
  root = fake_data.write_fake_crema_d(
      tmp / style / "raw", actors=tuple(range(1001, 1001 + args.actors)),
      sentences=("DFA", "IEO"), seconds=2.5, frames=3, frame_size=(360, 480),
      test_fraction=0.2, frame_style=style)
  jpeg_kb = statistics.median(
      p.stat().st_size for p in (root / "Image-01-FPS").rglob("*.jpg")) / 1e3
  clips = [tuple(l.split(",")) for l in (root / "train.csv").read_text().split()]
  names = data.layouts.CREMA_D_CLASSES
  clips = [(c, names.index(l)) for c, l in clips]

  start = time.perf_counter()
  builder = data.prepare("crema_d", root, tmp / style / "prepared",
                         frame_size=args.frame_size)
  prepare_s = time.perf_counter() - start
  source = data.load_prepared(builder.data_dir)["train"]
  # The raw loader reads exactly the clips of the prepared training split.
  train_ids = {source[i]["clip_id"].decode() for i in range(len(source))}
  clips = [c for c in clips if c[0] in train_ids]
  make = {
      "raw": lambda e: raw_batches(root, clips, args.batch_size, e),
      "host": lambda e: data.av_batches(source, batch_size=args.batch_size,
                                        train=True, epoch=e, augment="host"),
      "device": lambda e: data.av_batches(source, batch_size=args.batch_size,
                                          train=True, epoch=e,
                                          augment="device"),
  }
  times = {p: [] for p in PIPELINES}
  count = {}
  for e in range(args.epochs + 1):          # epoch 0: warm-up, not counted
    for p in PIPELINES:
      start = time.perf_counter()
      n = sum(len(b["labels"]) for b in make[p](e))
      if e:
        times[p].append(time.perf_counter() - start)
        count[p] = n
  rate = {p: count[p] / statistics.median(times[p]) for p in PIPELINES}
  stored_kb = statistics.median(
      len(f) for i in range(len(source)) for f in source[i]["frames"]) / 1e3
  return {"frame_style": style, "raw_jpeg_kb": jpeg_kb,
          "stored_jpeg_kb": stored_kb, "clips_per_epoch": count["raw"],
          "prepare_seconds": prepare_s,
          "samples_per_s": rate, "epoch_seconds": times,
          "speedup_host": rate["host"] / rate["raw"],
          "speedup_device": rate["device"] / rate["raw"],
          "device_augment": device_augment_ms(source, args.device_batch)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--actors", type=int, default=16)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--epochs", type=int, default=7)
  parser.add_argument("--device-batch", type=int, default=16)
  parser.add_argument("--styles", default="scene,noise")
  parser.add_argument("--frame-size", type=int, default=256,
                      help="shorter side of the stored frames")
  args = parser.parse_args(argv)

  tmp = pathlib.Path(tempfile.mkdtemp(prefix="arl_pipeline_"))
  os.environ["TMPDIR"] = str(tmp)
  import absl.logging
  absl.logging.set_verbosity(absl.logging.ERROR)
  results = [run_style(tmp, s, args) for s in args.styles.split(",")]
  import grain
  import jax
  import PIL
  import tensorflow_datasets as tfds
  report = {
      "command": "python -m benchmarks.input_pipeline " + " ".join(
          argv if argv is not None else sys.argv[1:]),
      "machine": {"cpu": platform.processor() or platform.machine(),
                  "cores": os.cpu_count(), "python": platform.python_version()},
      "versions": {"tensorflow_datasets": tfds.__version__,
                   "grain": getattr(grain, "__version__", "?"),
                   "pillow": PIL.__version__, "jax": jax.__version__},
      "batch_size": args.batch_size, "epochs": args.epochs,
      "results": results,
  }
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "input_pipeline.json").write_text(json.dumps(report, indent=1))
  lines = [
      "# Input pipeline (CREMA-D-shaped fake data)\n",
      f"- command: `{report['command']}`",
      f"- machine: {report['machine']}",
      f"- versions: {report['versions']}",
      f"- {results[0]['clips_per_epoch']} training clips per epoch (2.5 s of "
      "16 kHz audio and 3 frames of 480x360 each), batch "
      f"{args.batch_size}, one process, pipelines interleaved, median of "
      f"{args.epochs} epochs after a warm-up epoch\n",
  ]
  for r in results:
    lines += [
        f"## {r['frame_style']} frames (JPEG {r['raw_jpeg_kb']:.0f} KB at "
        f"480x360, {r['stored_jpeg_kb']:.0f} KB stored at 341x256)\n",
        "| pipeline | samples/s | vs reference |", "|---|---|---|"]
    for p in PIPELINES:
      lines.append(f"| {LABELS[p]} | {r['samples_per_s'][p]:,.0f} | "
                   f"{r['samples_per_s'][p] / r['samples_per_s']['raw']:.1f}x |")
    d = r["device_augment"]
    lines += ["", f"Device augmentation (jitted crop + flip + resize of a "
              f"batch of {d['batch']} from a {d['canvas'][0]}x"
              f"{d['canvas'][1]} canvas, backend {d['backend']}): "
              f"{d['ms_per_batch']:.1f} ms per batch. One-off preparation: "
              f"{r['prepare_seconds']:.1f} s.\n"]
  lines += [
      "## Reading these figures\n",
      "- The device row is the host's work only: the crop, flip and resize run "
      "inside the jitted train step (`FrameAugmentation`), 0.19 GFLOP per "
      "frame in two matmuls, which on a GPU or TPU is a few microseconds per "
      "frame next to a ~21 GFLOP/sample ResNet18 step. On this CPU the same "
      "work takes the time printed under each table, more than the host path "
      "spends: on a CPU-only machine `augment=\"host\"` (the runner's "
      "`augment=\"auto\"` picks it there) is the faster choice.",
      "- Where the prepared path saves: no resampling or STFT (the "
      "spectrogram is stored), a 341x256 JPEG at quality 90 instead of the "
      "480x360 original, uncompressed array_record records parsed straight "
      "from the proto, frames decoded by libjpeg-turbo (simplejpeg) into the "
      "batch array, one grain element per batch.",
      "- Noise frames are the worst case for JPEG decoding (5x the bytes of "
      "the face-like frames); real video frames compress like the latter.",
      "- The reference row resamples with scipy's polyphase filter (the "
      "function `prepare` uses); librosa's current default (soxr HQ) is ~1.5 "
      "ms per clip faster here, its older default (resampy) slower.",
      "- This VM's speed drifts by 20-40% over minutes: compare rows within "
      "a table (measured interleaved), not across tables.\n"]
  md = "\n".join(lines) + "\n"
  (RESULTS / "input_pipeline.md").write_text(md)
  print(md)
  return report


if __name__ == "__main__":
  main()
