"""The training runner's own step time on the CREMA-D ResNet18 configuration.

Runs ``experiments.train`` (the runner ``python -m experiments.main`` drives)
on fake local CREMA-D files of the real shapes (one 224x224 frame, a 257x188
spectrogram, two ResNet18 encoders) for a few epochs and reports the time per
training step from ``timings.jsonl`` (``train_time_s / steps``, the epoch
after compilation), next to what one data-parallel step communicates.

  python -m benchmarks.runner_step [--devices 1] [--batch 16]

Results: ``benchmarks/results/runner_step_<backend>.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import tempfile

# All-reduce volume of one data-parallel step of this model (README, "What a
# step communicates"): fp32 gradients of 22,352,902 parameters, BatchNorm
# statistics of 40 layers (jit path), ARL's 21 sums.
GRADIENT_BYTES = 22_352_902 * 4
BN_BYTES = 4_800 * 2 * 4 * 4
ARL_BYTES = 21 * 4


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--epochs", type=int, default=3)
  args = parser.parse_args(argv)
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)

  from benchmarks import fake_data
  from experiments import train
  from experiments.configs import crema_d
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="runner_step_"))
  root = fake_data.write_fake_crema_d(tmp / "raw", actors=(1001, 1002, 1003,
                                                          1004),
                                     sentences=("DFA", "IEO"), frames=1,
                                     seconds=3.0, test_fraction=0.2)
  c = crema_d.get_config()
  c.data.path = str(root)
  c.batch_size = c.eval_batch_size = args.batch
  c.num_epochs, c.warmup_epochs = args.epochs, 0
  c.progress, c.plots = "none", False
  c.parallel.devices = args.devices
  report = train.train_and_evaluate(c, tmp / "run")
  history = [json.loads(l) for l in
             (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
  timings = [json.loads(l) for l in
             (tmp / "run" / "timings.jsonl").read_text().splitlines()]
  after_compile = timings[1:] or timings
  steps = sum(h["steps"] for h in history[1:] or history)
  seconds = sum(h["train_time_s"] for h in after_compile)
  per_step = seconds / steps
  backend = jax.default_backend()
  md = (
      f"# Runner step time, CREMA-D ResNet18 configuration ({backend})\n\n"
      f"- command: `python -m benchmarks.runner_step --devices {args.devices} "
      f"--batch {args.batch} --epochs {args.epochs}`\n"
      f"- machine: {platform.machine()}, jax {jax.__version__}, "
      f"{report['parallel']}\n"
      f"- global batch {args.batch}, one 224x224 frame and a 257x188 "
      "spectrogram per clip, fake local files through the real TFDS + grain "
      "pipeline; epochs after the first (compilation) only\n\n"
      "| quantity | value |\n|---|---|\n"
      f"| training step (runner, measured) | {per_step * 1e3:.0f} ms "
      f"({steps} steps) |\n"
      f"| samples/s | {args.batch / per_step:.1f} |\n"
      f"| all-reduce per data-parallel step: gradients (fp32) | "
      f"{GRADIENT_BYTES / 1e6:.1f} MB |\n"
      f"| BatchNorm statistics (jit path) | {BN_BYTES / 1e3:.0f} KB |\n"
      f"| ARL statistics | {ARL_BYTES} bytes |\n")
  out = pathlib.Path(__file__).parent / "results" / f"runner_step_{backend}.md"
  out.write_text(md)
  print(md)


if __name__ == "__main__":
  main()
