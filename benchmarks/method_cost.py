"""Step time of every registered method relative to ``concat``, one process.

Each method's jitted step (``arl_jax.make_train_step``, the runner's SGD
chain) on the same model, batch and parameters; medians of synchronised
steps after ``--warmup``, timed by :func:`benchmarks.step.measure`:
``--steps`` rounds, each running ``--block`` consecutive steps of every
method (the first of each block not counted: after AGM's large step the
next method's first step is slower), the order rotating between rounds.

  python -m benchmarks.method_cost [--model mlp|resnet] [--batch 64]

Results: ``benchmarks/results/method_cost_<model>_<backend>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import statistics

import jax
import jax.numpy as jnp
import optax

import arl_jax
from arl_jax import models
from benchmarks import step as step_bench

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("mlp", "resnet"), default="mlp")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--block", type=int, default=None,
                      help="consecutive steps of one method per round, the "
                           "first not counted (default: 11 MLP, 1 ResNet)")
  parser.add_argument("--methods", default=",".join(arl_jax.method_names()))
  args = parser.parse_args(argv)
  x, y, classes = step_bench._jax_inputs(args.model, args.batch)
  model = step_bench._jax_model(args.model, classes, jnp.float32)
  names = tuple(x)
  params, model_state = models.init_model(model, jax.random.PRNGKey(0), x)
  batch = {"inputs": x, "labels": y}
  feats = jax.device_get(model.apply({"params": params, **model_state}, x,
                                     train=False, features_only=True))
  impls, skipped = {}, {}
  for name in args.methods.split(","):
    tx = arl_jax.with_modality_scales(
        optax.chain(*step_bench._optimizer()),
        arl_jax.label_modalities(names))
    method = arl_jax.make_method(name)
    try:
      method.init_state(names)
    except ValueError as e:           # e.g. PMR at K != 2
      skipped[name] = str(e)
      continue
    state = arl_jax.TrainState.create(
        params=jax.tree.map(jnp.copy, params), tx=tx,
        model_state=jax.tree.map(jnp.copy, model_state),
        rng=jax.random.PRNGKey(1), method=method, modalities=names)
    if method.needs_features:     # PMR: its prototypes, before a step
      state, _ = method.epoch_end(0, state, arl_jax.EpochContext(
          modalities=names, num_classes=classes,
          features=lambda split: (feats, jax.device_get(y))))
    apply_fn = models.make_apply_fn(model,
                                    with_features=method.needs_features)
    step = jax.jit(arl_jax.make_train_step(apply_fn, tx, method),
                   donate_argnums=0)
    impls[name] = [step, state]
  def runner(impl):
    def run():
      impl[1], m = impl[0](impl[1], batch)
      jax.block_until_ready((impl[1], m))
    return run

  block = args.block if args.block is not None else (
      1 if args.model == "resnet" else 11)
  res = step_bench.measure({n: runner(impl) for n, impl in impls.items()},
                           args.steps, args.warmup, block=block)
  times = {n: r["times_s"] for n, r in res.items()}
  median = {n: statistics.median(t) for n, t in times.items()}
  base = median.get("concat", min(median.values()))
  backend = jax.default_backend()
  lines = [
      f"# Step time per method ({args.model}, batch {args.batch}, {backend})",
      "",
      f"- date: {datetime.datetime.now(datetime.UTC).isoformat()}",
      f"- command: `python -m benchmarks.method_cost --model {args.model} "
      f"--batch {args.batch} --steps {args.steps} --block {block}`",
      f"- machine: {platform.processor() or platform.machine()}, device: "
      f"{jax.devices()[0].device_kind}; jax {jax.__version__}",
      "",
      "| method | median step (ms) | relative to concat |",
      "|---|---|---|",
  ]
  for name, t in sorted(median.items(), key=lambda kv: kv[1]):
    lines.append(f"| {name} | {1e3 * t:.2f} | {t / base:.2f}x |")
  for name, why in skipped.items():
    lines.append(f"| {name} | - | not applicable: {why} |")
  text = "\n".join(lines) + "\n"
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"method_cost_{args.model}_{backend}.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
