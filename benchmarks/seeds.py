"""Samples/s of S seeds trained as one program (the ARL step vmapped over a
seed axis) against one seed, S = 1, 5, 16.

For each model (the UCI MLP, the audio-visual ResNet18) and each S, the
runner's multi-seed step is built as ``config.num_seeds`` builds it: S
states (each seed's own initialisation and key) stacked on a leading axis,
``jax.jit(jax.vmap(make_train_step(...)))`` with the state donated, and a
batch of S x B rows (each seed its own rows). S = 1 is the plain step, not
vmapped (what the one-seed runner runs). Timing: the median of ``--steps``
synchronised steps after ``--warmup``, S interleaved round by round
(:func:`benchmarks.step.measure`); compile time separately (AOT).

  python -m benchmarks.seeds                       # CPU: MLP batch 64, ResNet batch 2
  python -m benchmarks.seeds --preset gpu          # MLP 256, ResNet 32
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import jax
import jax.numpy as jnp
import optax

import arl_jax
from arl_jax import models
from benchmarks.step import RESULTS
from benchmarks.step import _jax_inputs
from benchmarks.step import _jax_model
from benchmarks.step import _machine
from benchmarks.step import _optimizer
from benchmarks.step import _versions
from benchmarks.step import measure
from benchmarks.step import prepare_jax
from experiments import distributed


def seeds_step(kind: str, batch: int, num_seeds: int, program: str = "vmap"):
  """(compile seconds, run) of ``num_seeds`` seeds' ARL step as one program
  (``program``: ``"vmap"`` or ``"map"``, as ``config.seed_program``)."""
  x, y, classes = _jax_inputs(kind, batch)
  model = _jax_model(kind, classes, jnp.float32)
  names = tuple(x)
  apply_fn = models.make_apply_fn(model)
  tx = arl_jax.with_modality_scales(optax.chain(*_optimizer()),
                                    arl_jax.label_modalities(names))
  step = arl_jax.make_train_step(apply_fn, tx,
                                 arl_jax.ARL(temperature=8.0, gamma=4.0))
  states, batches = [], []
  for s in range(num_seeds):
    params, model_state = models.init_model(model, jax.random.PRNGKey(s), x)
    states.append(arl_jax.TrainState.create(
        params=params, tx=tx, model_state=model_state,
        rng=jax.random.PRNGKey(1000 + s)))
    xs, ys, _ = _jax_inputs(kind, batch, seed=s)
    batches.append({"inputs": xs, "labels": ys})
  if num_seeds == 1:
    fn, state, data = step, states[0], batches[0]
  else:
    stack = lambda trees: jax.tree.map(lambda *v: jnp.stack(v), *trees)
    fn, state, data = (distributed.over_seeds(step, program), stack(states),
                       stack(batches))
  del states, batches
  return prepare_jax(fn, state, data)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--seeds", type=int, nargs="+", default=[1, 5, 16])
  parser.add_argument("--models", nargs="+", default=["mlp", "resnet"])
  parser.add_argument("--programs", nargs="+", default=["vmap", "map"])
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  batches = ({"mlp": 64, "resnet": 2} if args.preset == "cpu"
             else {"mlp": 256, "resnet": 32})
  rows = []
  for kind in args.models:
    steps = args.steps or (30 if kind == "mlp" else 3)
    impls, compile_s = {}, {}
    keys = [(n, p) for n in args.seeds
            for p in (["-"] if n == 1 else args.programs)]
    for n, p in keys:
      compile_s[n, p], impls[n, p] = seeds_step(kind, batches[kind], n,
                                                p if n > 1 else "vmap")
      print(f"{kind}: {n} seeds ({p}) compiled in {compile_s[n, p]:.1f} s",
            file=sys.stderr, flush=True)
    timed = measure(impls, steps, args.warmup)
    base = None
    for n, p in keys:
      t = timed[n, p]["median_s"]
      sps = n * batches[kind] / t
      base = sps if base is None else base
      rows.append({"model": kind, "batch_per_seed": batches[kind],
                   "seeds": n, "program": p, "median_step_s": t,
                   "samples_per_s": sps, "vs_one_seed": sps / base,
                   "compile_s": compile_s[n, p],
                   "peak_rss_bytes": timed[n, p]["peak_rss_bytes"]})
      print(f"{kind} x{n} {p}: {sps:,.0f} samples/s ({sps / base:.2f}x)",
            file=sys.stderr, flush=True)
  device = jax.devices()[0]
  report = {
      "date": datetime.datetime.now(datetime.UTC).isoformat(),
      "command": "python -m benchmarks.seeds" + (
          f" {' '.join(argv)}" if argv else " " + " ".join(sys.argv[1:])
      ).rstrip(),
      "machine": _machine(), "versions": _versions(),
      "device": (device.platform if device.device_kind == device.platform
                 else f"{device.platform} ({device.device_kind})"),
      "rows": rows}
  out = args.out or f"seeds_{args.preset}"
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"{out}.json").write_text(json.dumps(report, indent=1))
  (RESULTS / f"{out}.md").write_text(markdown(report))
  print(markdown(report))


def markdown(report) -> str:
  lines = [
      f"# Seeds in one program ({report['device']})", "",
      f"- date: {report['date']}",
      f"- command: `{report['command']}`",
      f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} "
      "cores",
      "- versions: " + ", ".join(f"{k} {v}" for k, v in
                                 report["versions"].items() if v), "",
      "The ARL step of S seeds as one program (`jax.vmap` over the seed "
      "axis, `vmap`, or one seed after the other inside the program, "
      "`map`; each seed its own initialisation, key and rows), against the "
      "plain one-seed step; samples/s counts every seed's rows.", "",
      "| model | batch per seed | seeds | program | samples/s | vs 1 seed | "
      "median step (ms) | compile (s) | peak RSS (MiB) |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in report["rows"]:
    lines.append(
        f"| {r['model']} | {r['batch_per_seed']} | {r['seeds']} | "
        f"{r['program']} | "
        f"{r['samples_per_s']:,.0f} | {r['vs_one_seed']:.2f}x | "
        f"{r['median_step_s'] * 1e3:.1f} | {r['compile_s']:.1f} | "
        f"{r['peak_rss_bytes'] / 2**20:,.0f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
