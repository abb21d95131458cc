"""Does ARL act under SGD and AdamW? Both placements of the scale, main-job problems.

For each problem of the main job (``experiments.compare``) and each seed,
trains concat, unimodal regularisation (UR: ARL's loss without its scales) and
ARL with

* ``sgd``: the paper's SGD (momentum 0.9, coupled weight decay), scale on the
  gradient (what ``optim.scale_placement=auto`` picks for SGD);
* ``adamw, scale before``: the scale on the gradient, before AdamW
  (``scale_placement=gradient``, the train step's check switched off): Adam
  divides each coordinate by its own RMS, so the scale cancels;
* ``adamw, scale after``: after AdamW, a per-modality step size (what
  ``auto`` picks for AdamW).

ARL - UR isolates what the scales do (same loss, same initialisation and
batch order per seed). The encoder-distance ratio ARL / UR is how much
further ARL moved each encoder from its initialisation. Writes
``experiments/results/optimizers.{md,json}``.

  python -m experiments.optimizers        # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import numpy as np

from experiments import compare

VARIANTS = {
    "sgd": dict(name="sgd", scale_placement="auto"),
    "adamw, scale before": dict(name="adamw", scale_placement="gradient",
                                check_scales=False, learning_rate=1e-3),
    "adamw, scale after": dict(name="adamw", scale_placement="auto",
                               learning_rate=1e-3),
}
METHODS = ("concat", "unimodal_regularisation", "arl")


def run_all(seeds, workroot: pathlib.Path):
  from experiments import train
  results = {}
  for problem, base in compare.settings().items():
    for variant, optim in VARIANTS.items():
      for method in METHODS:
        if method == "concat" and variant == "adamw, scale before":
          continue       # no scales: the same run as "scale after"
        for seed in seeds:
          c = base.copy_and_resolve_references()
          c.optim.update(optim)
          c.method.name, c.seed = method, seed
          c.plots, c.progress = False, "none"
          c.checkpoint_every_epochs = c.num_epochs
          workdir = (workroot / problem / variant.replace(", ", "_")
                     .replace(" ", "_") / method / f"seed{seed}")
          done = workdir / "results.json"
          report = (json.loads(done.read_text()) if done.exists()
                    else train.train_and_evaluate(c, workdir))
          results.setdefault(problem, {}).setdefault(variant, {}).setdefault(
              method, []).append(report)
          print(f"{problem:36s} {variant:20s} {method:24s} seed {seed}: "
                f"{report['test_accuracy_at_best_val']:.4f}", flush=True)
  return results


def _ms(x):
  x = 100 * np.asarray(x)
  return f"{x.mean():.2f} ± {x.std():.2f}"


def table(results) -> str:
  lines = []
  for problem, by_variant in results.items():
    lines += [f"### {problem}", "",
              "| optimiser | concat | UR | ARL | ARL − UR (paired) | "
              "encoder distance ARL / UR |", "|---|---|---|---|---|---|"]
    for variant, by in by_variant.items():
      acc = {m: [r["test_accuracy_at_best_val"] for r in by[m]] for m in by}
      diff = np.subtract(acc["arl"], acc["unimodal_regularisation"])
      ratio = {m: np.mean([a["encoder_distance"][m] / u["encoder_distance"][m]
                           for a, u in zip(by["arl"],
                                           by["unimodal_regularisation"])])
               for m in by["arl"][0]["encoder_distance"]}
      concat = _ms(acc["concat"]) if "concat" in acc else "(as after)"
      lines.append(
          f"| {variant} | {concat} | {_ms(acc['unimodal_regularisation'])} | "
          f"{_ms(acc['arl'])} | {100 * diff.mean():+.2f} ± "
          f"{100 * diff.std():.2f} | "
          + ", ".join(f"{m} {v:.3f}" for m, v in ratio.items()) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--workroot",
                      default=str(compare.ROOT / "workdirs" / "optimizers"))
  parser.add_argument("--out", default=str(compare.OUT))
  args = parser.parse_args(argv)
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  workroot = pathlib.Path(args.workroot)
  jax.config.update("jax_compilation_cache_dir", str(workroot / ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  start = time.perf_counter()
  results = run_all(range(args.seeds), workroot)
  md = ("# ARL under SGD and AdamW: where the scale goes\n\n"
        f"- command: `python -m experiments.optimizers --seeds {args.seeds}`\n"
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, jax {jax.__version__}, backend "
        f"{jax.default_backend()}; {(time.perf_counter() - start) / 60:.1f} "
        "min in all\n"
        f"- test accuracy % at the best validation epoch, mean ± std over "
        f"{args.seeds} seeds; 'ARL − UR' is the paired difference over seeds "
        "(same initialisation and batch order); SGD lr as in the main job, "
        "AdamW lr 1e-3 (weight decay 1e-4, decoupled), both after clipping "
        "at 40.\n\n" + table(results))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "optimizers.md").write_text(md)
  (out / "optimizers.json").write_text(json.dumps(results, indent=1))
  print(md)


if __name__ == "__main__":
  main()
