"""Short offline demo: concat vs ARL on a two-modality synthetic problem.

Run: ``python -m experiments.demo`` (or ``make run``). The problem is
linear-Gaussian with a clean modality ("audio", sigma 1.0) and a noisy one
("visual", sigma 2.5), so the Bayes-optimal accuracy is known. The script
prints ARL's per-modality q, s and coefficients during training and the test
accuracy of both methods next to the Bayes accuracy. About 20 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np
import optax

import arl_jax
from arl_jax import models
from arl_jax.data import iterate_batches
from arl_jax.data import make_linear_gaussian


def build(problem, method, seed, lr):
  modalities = tuple(problem.splits["train"][0])
  model = models.MultimodalClassifier(
      encoders={m: models.MLPEncoder((32,)) for m in modalities},
      head=models.ConcatFusion(problem.num_classes, modalities))
  example = {m: x[:2] for m, x in problem.splits["train"][0].items()}
  params, model_state = models.init_model(model, jax.random.PRNGKey(seed),
                                          example)
  labels = functools.partial(models.modality_labels, modalities=modalities)
  tx = optax.chain(arl_jax.scale_by_modality(labels),
                   optax.clip_by_global_norm(40.0),
                   optax.add_decayed_weights(1e-4),
                   optax.sgd(lr, momentum=0.9))
  state = arl_jax.TrainState.create(params=params, tx=tx, model_state=model_state,
                                    rng=jax.random.PRNGKey(seed + 1))
  apply_fn = models.make_apply_fn(model)
  return state, apply_fn, tx


def evaluate(eval_step, state, inputs, labels, batch_size=256):
  correct = count = 0.0
  for batch in iterate_batches(inputs, labels, batch_size):
    sums = eval_step(state, batch)
    correct += float(sums["correct"])
    count += float(sums["count"])
  return correct / count


def run(method, problem, *, epochs, batch_size, warmup_epochs, seed, lr,
        verbose):
  state, apply_fn, tx = build(problem, method, seed, lr)
  x, y = problem.splits["train"]
  steps_per_epoch = -(-len(y) // batch_size)
  train_step = jax.jit(arl_jax.make_train_step(
      apply_fn, tx, method, warmup_steps=warmup_epochs * steps_per_epoch),
      donate_argnums=0)
  eval_step = jax.jit(arl_jax.make_eval_step(apply_fn))
  for epoch in range(epochs):
    history = []
    for batch in iterate_batches(x, y, batch_size, shuffle=True, seed=seed,
                                 epoch=epoch):
      state, metrics = train_step(state, batch)
      history.append(metrics)
    if verbose and (epoch % 4 == 3 or epoch == epochs - 1):
      last = jax.device_get(history[-1])
      per_mod = "  ".join(
          f"{m}: q={last['q'][m]:.2f} s={last['s'][m]:.1f} a={last['a'][m]:.3f}"
          for m in last["a"])
      print(f"  epoch {epoch + 1:3d}  loss {np.mean([h['loss'] for h in history]):.3f}"
            f"  {per_mod}")
  return evaluate(eval_step, state, *problem.splits["test"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=16)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  problem = make_linear_gaussian({"audio": 1.0, "visual": 2.5}, num_classes=6,
                                 dim=8, seed=args.seed)
  print(f"arl_jax {arl_jax.__version__} demo on {jax.devices()[0].platform}: "
        "two-modality linear-Gaussian problem, 6 classes")
  print(f"Bayes-optimal test accuracy {problem.bayes_accuracy:.3f} "
        f"(audio alone {problem.unimodal_bayes_accuracy['audio']:.3f}, "
        f"visual alone {problem.unimodal_bayes_accuracy['visual']:.3f}); "
        "optimal weights "
        + ", ".join(f"{m} {w:.2f}" for m, w in problem.optimal_weights.items()))
  results = {}
  for method in (arl_jax.make_method("concat"),
                 arl_jax.make_method("arl", temperature=4.0, gamma=4.0)):
    start = time.perf_counter()
    print(f"{method.name}:")
    results[method.name] = run(method, problem, epochs=args.epochs,
                               batch_size=args.batch_size, warmup_epochs=2,
                               seed=args.seed, lr=0.01, verbose=True)
    print(f"  test accuracy {results[method.name]:.3f} "
          f"({time.perf_counter() - start:.1f} s)")
  print("summary: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items())
        + f", Bayes {problem.bayes_accuracy:.3f}")
  return results


if __name__ == "__main__":
  main()
