"""Samples/s of one full ARL training step: arl_jax vs a PyTorch reference.

In one process, for each configuration (model, batch size, dtype) it times:

1. ``arl_jax``: the library's ARL train step (forward, unimodal logits through
   the shared head, ARL loss, statistics, coefficients, scaled gradients, clip
   40, SGD momentum 0.9 + weight decay 1e-4), jitted with donated state;
2. ``jax_plain``: the same jitted step without ARL (fused logits only, one
   cross-entropy, no statistics, no scaling) -> ARL's overhead;
3. ``torch_ref``: :mod:`benchmarks.torch_reference`, the reference step in
   PyTorch (host-side coefficient statistics every step, as released).

Each is timed as the median of ``--steps`` steps after ``--warmup`` steps
(synchronised each step); JAX compile time is measured separately (AOT
``lower().compile()``). Peak memory: process RSS sampled during each phase on
CPU, device peak bytes on GPU. Results go to ``benchmarks/results/`` as JSON
and a markdown table.

  python -m benchmarks.step                    # CPU defaults (batch 8)
  python -m benchmarks.step --preset gpu       # batch 64 and 256, fp32 + bf16
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import threading
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import arl_jax  # noqa: E402
from arl_jax import models  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
UCI_DIMS = {"fourier": 76, "profile": 216, "karhunen": 64, "pixel": 240,
            "zernike": 47, "morphological": 6}


class PeakRSS:
  """Samples this process's resident set size in a thread (CPU memory)."""

  def __init__(self, interval=0.005):
    self.interval, self.peak, self._stop = interval, 0, threading.Event()

  @staticmethod
  def current():
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
    return 0

  def __enter__(self):
    self.peak = self.current()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.current())
      time.sleep(self.interval)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def _device_peak_bytes():
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  return (device.memory_stats() or {}).get("peak_bytes_in_use")


def measure(impls, rounds, warmup, after_warmup=lambda name: None, block=1,
            groups=None):
  """Warm-up (and peak memory) per implementation, then interleaved timing.

  ``impls`` maps a name to a zero-argument function running one synchronised
  step; ``groups`` (default: all together) lists the names timed against
  each other, one group after the other. Within a group, after each
  implementation's warm-up (during which its peak memory is taken), each of
  ``rounds`` rounds runs ``block`` consecutive steps of every implementation
  in an order that rotates from round to round, so that slow drifts of the
  machine hit all of them alike. With ``block > 1`` the first step of each
  block is not counted: it pays for the switch (cold caches), which a
  training loop, one step after another, does not.

  PyTorch goes in a group of its own: its OpenMP workers keep spinning on
  the cores after its step returns, and interleaved with it the JAX steps
  ran slower, the ARL step most (2-core CPU, MLP: 91k samples/s right after
  PyTorch steps against 137k without them).
  """
  out = {}
  for group in (groups or [list(impls)]):
    for name in group:
      with PeakRSS() as rss:
        for _ in range(warmup):
          impls[name]()
      out[name] = {"peak_rss_bytes": rss.peak, "times_s": []}
      after_warmup(name)
    for r in range(rounds):
      for name in group[r % len(group):] + group[:r % len(group)]:
        for k in range(block):
          start = time.perf_counter()
          impls[name]()
          if block == 1 or k > 0:
            out[name]["times_s"].append(time.perf_counter() - start)
  out = {name: out[name] for name in impls}
  for r in out.values():
    r["median_s"] = statistics.median(r["times_s"])
  return out


# ----------------------------------------------------------------- JAX side --

def _jax_inputs(kind, batch, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "resnet":
    x = {"audio": rng.normal(size=(batch, 257, 188)),
         "visual": rng.normal(size=(batch, 1, 224, 224, 3))}
    classes = 6
  else:
    x = {m: rng.normal(size=(batch, d)) for m, d in UCI_DIMS.items()}
    classes = 10
  x = {m: jnp.asarray(v, jnp.float32) for m, v in x.items()}
  y = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)
  return x, y, classes


def _jax_model(kind, classes, dtype):
  if kind == "resnet":
    return models.audio_visual_classifier(classes, dtype=dtype)
  return models.multiview_classifier(UCI_DIMS, classes, encoder_widths=(64,),
                                     dtype=dtype)


def _optimizer():
  return [optax.clip_by_global_norm(40.0), optax.add_decayed_weights(1e-4),
          optax.sgd(1e-3, momentum=0.9)]


def jax_steps(kind, batch, dtype, device_augment=False):
  """Returns {"arl_jax": (step, state, batch), "jax_plain": ...}.

  ``device_augment`` (ResNet only) adds ``arl_jax_devaug``: the same ARL step
  fed what ``av_batches(..., augment="device")`` yields (uint8 frames in a
  256x341 canvas plus their sizes), cropping, flipping and resizing them in
  the step with :class:`arl_jax.data.FrameAugmentation`.
  """
  x, y, classes = _jax_inputs(kind, batch)
  model = _jax_model(kind, classes, dtype)
  names = tuple(x)
  params, model_state = models.init_model(model, jax.random.PRNGKey(0), x)
  apply_fn = models.make_apply_fn(model)
  labels = functools.partial(models.modality_labels, modalities=names)
  arl_tx = optax.chain(arl_jax.scale_by_modality(labels), *_optimizer())
  arl_state = arl_jax.TrainState.create(params=params, tx=arl_tx,
                                        model_state=model_state,
                                        rng=jax.random.PRNGKey(1))
  arl_step = arl_jax.make_train_step(
      apply_fn, arl_tx, arl_jax.ARL(temperature=8.0, gamma=4.0))

  plain_tx = optax.chain(*_optimizer())
  plain_state = arl_jax.TrainState.create(
      params=jax.tree.map(jnp.copy, params), tx=plain_tx,
      model_state=jax.tree.map(jnp.copy, model_state), rng=jax.random.PRNGKey(1))

  def plain_step(state, batch):
    def loss_fn(p):
      variables = {"params": p, **state.model_state}
      if state.model_state:
        fused, new_ms = model.apply(variables, batch["inputs"], train=True,
                                    fused_only=True,
                                    mutable=list(state.model_state))
      else:
        fused, new_ms = model.apply(variables, batch["inputs"], train=True,
                                    fused_only=True), {}
      return arl_jax.cross_entropy(fused, batch["labels"]), new_ms
    (loss, new_ms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = plain_tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1,
                         params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, model_state=dict(new_ms)), {
                             "loss": loss}

  data = {"inputs": x, "labels": y}
  steps = {"arl_jax": (arl_step, arl_state, data),
           "jax_plain": (plain_step, plain_state, data)}
  if device_augment and kind == "resnet":
    from arl_jax.data import FrameAugmentation
    rng = np.random.default_rng(1)
    canvas = rng.integers(0, 256, (batch, 1, 256, 341, 3), dtype=np.uint8)
    raw = {"inputs": {"audio": x["audio"], "visual": jnp.asarray(canvas)},
           "labels": y, "frame_hw": jnp.tile(jnp.array([256, 341], jnp.int32),
                                             (batch, 1, 1))}
    aug_step = arl_jax.make_train_step(
        apply_fn, arl_tx, arl_jax.ARL(temperature=8.0, gamma=4.0),
        preprocess=FrameAugmentation(image_size=224).train)
    aug_state = jax.tree.map(jnp.copy, arl_state)   # each step donates its own
    steps["arl_jax_devaug"] = (aug_step, aug_state, raw)
  return steps


def prepare_jax(step, state, batch):
  """Compiles ``step`` (AOT, timed) and returns (compile seconds, run)."""
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  return compile_s, run


# --------------------------------------------------------------- torch side --

def prepare_torch(kind, batch, dtype, device):
  import torch

  from benchmarks import torch_reference as tr
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  if kind == "resnet":
    model = tr.audio_visual_model(6)
    x = {"audio": rng.normal(size=(batch, 257, 188)),
         "visual": rng.normal(size=(batch, 1, 3, 224, 224))}
    classes = 6
  else:
    model = tr.multiview_model(UCI_DIMS, 64, 10)
    x = {m: rng.normal(size=(batch, d)) for m, d in UCI_DIMS.items()}
    classes = 10
  x = {m: torch.as_tensor(v, dtype=torch.float32, device=device)
       for m, v in x.items()}
  y = torch.as_tensor(rng.integers(0, classes, batch), device=device)
  step = tr.ReferenceStep(model, temperature=8.0, gamma=4.0, device=device,
                          autocast_dtype=torch.bfloat16 if dtype == "bfloat16"
                          else None)
  cuda = device.startswith("cuda")
  if cuda:
    torch.cuda.reset_peak_memory_stats()

  def run():
    step(x, y)
    if cuda:
      torch.cuda.synchronize()

  def device_peak():
    return torch.cuda.max_memory_allocated() if cuda else None

  return run, device_peak


# ------------------------------------------------------------------ driver --

PRESETS = {
    "cpu": {"mlp": [(64, "float32")],
            "resnet": [(8, "float32"), (8, "bfloat16")]},
    "gpu": {"resnet": [(64, "float32"), (64, "bfloat16"), (256, "float32"),
                       (256, "bfloat16")],
            "mlp": [(64, "float32")]},
}


def _versions():
  out = {"python": platform.python_version(), "jax": jax.__version__,
         "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
         else None, "flax": flax.__version__, "optax": optax.__version__,
         "arl_jax": arl_jax.__version__}
  try:
    import jaxlib
    out["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  try:
    import torch
    out["torch"] = torch.__version__
  except ImportError:
    out["torch"] = None
  return out


def _machine():
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS),
                      default="gpu" if jax.default_backend() == "gpu" else "cpu")
  parser.add_argument("--models", default="mlp,resnet")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed rounds, one block of steps of each "
                           "implementation per round (default: 30; 20 for "
                           "the ResNet on CPU)")
  parser.add_argument("--block", type=int, default=None,
                      help="consecutive steps of one implementation per "
                           "round, the first not counted (default: 11 MLP, "
                           "1 ResNet)")
  parser.add_argument("--warmup", type=int, default=None)
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--device-augment", default=None,
                      action=argparse.BooleanOptionalAction,
                      help="also time the ARL step with the crop/flip/resize "
                           "on the device (default: on for the gpu preset)")
  parser.add_argument("--out", default=None, help="results file stem")
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  torch_device = "cuda" if backend == "gpu" else "cpu"
  rows = []
  for kind in args.models.split(","):
    for batch, dtype in PRESETS[args.preset][kind]:
      block = args.block if args.block is not None else (
          1 if kind == "resnet" else 11)
      if args.steps is not None:
        steps = args.steps
      else:
        steps = 30 if backend != "cpu" or kind != "resnet" else 20
      warmup = args.warmup if args.warmup is not None else (
          8 if backend != "cpu" else (2 if kind == "resnet" else 30))
      jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
      row = {"model": kind, "batch": batch, "dtype": dtype, "rounds": steps,
             "block": block, "warmup": warmup}
      print(f"[{kind} b{batch} {dtype}] compiling ...", flush=True)
      impls, compile_s, device_peak = {}, {}, {}
      device_augment = (args.device_augment if args.device_augment is not None
                        else args.preset == "gpu")
      for name, (step, state, data) in jax_steps(
          kind, batch, jdtype, device_augment).items():
        compile_s[name], impls[name] = prepare_jax(step, state, data)
        del state
      if not args.skip_torch:
        impls["torch_ref"], torch_peak = prepare_torch(kind, batch, dtype,
                                                       torch_device)
      print(f"[{kind} b{batch} {dtype}] timing {list(impls)} ...", flush=True)
      # Device peaks: JAX's allocator peak is process-wide and cannot be
      # reset, so it is read right after each JAX implementation's warm-up.

      def after_warmup(name, device_peak=device_peak):
        if name != "torch_ref":
          device_peak[name] = _device_peak_bytes()

      jax_names = [n for n in impls if n != "torch_ref"]
      row["results"] = measure(
          impls, steps, warmup, after_warmup, block,
          groups=[jax_names] + ([["torch_ref"]] if "torch_ref" in impls
                                else []))
      if "torch_ref" in row["results"]:
        device_peak["torch_ref"] = torch_peak()
      for name, r in row["results"].items():
        r["compile_s"] = compile_s.get(name)
        r["peak_device_bytes"] = device_peak.get(name)
      for r in row["results"].values():
        r["samples_per_s"] = batch / r["median_s"]
      res = row["results"]
      row["arl_overhead"] = res["arl_jax"]["median_s"] / res["jax_plain"][
          "median_s"] - 1.0
      if "arl_jax_devaug" in res:
        row["device_augment_overhead"] = res["arl_jax_devaug"]["median_s"] / (
            res["arl_jax"]["median_s"]) - 1.0
      if "torch_ref" in res:
        row["speedup_vs_torch"] = (res["arl_jax"]["samples_per_s"] /
                                   res["torch_ref"]["samples_per_s"])
      print(_row_line(row), flush=True)
      rows.append(row)

  device = jax.devices()[0]
  report = {
      "date": datetime.datetime.now(datetime.UTC).isoformat(),
      "command": "python -m benchmarks.step " + " ".join(
          argv if argv is not None else sys.argv[1:]),
      "machine": _machine(),
      "device": {"platform": device.platform, "kind": device.device_kind,
                 "count": jax.device_count()},
      "versions": _versions(),
      "rows": rows,
  }
  RESULTS.mkdir(parents=True, exist_ok=True)
  stem = args.out or f"step_{device.platform}"
  (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
  (RESULTS / f"{stem}.md").write_text(markdown(report))
  print(markdown(report))
  return report


def _row_line(row):
  res = row["results"]
  parts = [f"{k} {v['samples_per_s']:.1f}/s" for k, v in res.items()]
  extra = f"ARL overhead {100 * row['arl_overhead']:+.1f}%"
  if "device_augment_overhead" in row:
    extra += (f", device augmentation "
              f"{100 * row['device_augment_overhead']:+.1f}%")
  if "speedup_vs_torch" in row:
    extra += f", arl_jax/torch {row['speedup_vs_torch']:.2f}x"
  return f"  {row['model']} b{row['batch']} {row['dtype']}: " + ", ".join(
      parts) + f"; {extra}"


def _mb(x):
  return "-" if not x else f"{x / 2**20:,.0f}"


def markdown(report):
  lines = [
      f"# Train-step benchmark ({report['device']['kind']})", "",
      f"- date: {report['date']}",
      f"- command: `{report['command']}`",
      f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} "
      f"cores; device: {report['device']['platform']} "
      f"({report['device']['kind']})",
      "- versions: " + ", ".join(f"{k} {v}" for k, v in
                                 report["versions"].items()), "",
      "| model | batch | dtype | implementation | samples/s | median step (ms) "
      "| compile (s) | peak RSS (MiB) | peak device (MiB) |",
      "|---|---|---|---|---|---|---|---|---|"]
  for row in report["rows"]:
    for name, r in row["results"].items():
      compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
      lines.append(
          f"| {row['model']} | {row['batch']} | {row['dtype']} | {name} | "
          f"{r['samples_per_s']:,.1f} | {1e3 * r['median_s']:,.1f} | "
          f"{compile_s} | {_mb(r['peak_rss_bytes'])} | "
          f"{_mb(r['peak_device_bytes'])} |")
  lines += ["", "| model | batch | dtype | ARL overhead vs plain jitted step "
            "| arl_jax / torch_ref | device crop/flip/resize vs ARL step |",
            "|---|---|---|---|---|---|"]
  for row in report["rows"]:
    speed = row.get("speedup_vs_torch")
    aug = row.get("device_augment_overhead")
    lines.append(f"| {row['model']} | {row['batch']} | {row['dtype']} | "
                 f"{100 * row['arl_overhead']:+.1f}% | "
                 f"{'-' if speed is None else f'{speed:.2f}x'} | "
                 f"{'-' if aug is None else f'{100 * aug:+.1f}%'} |")
  lines.append("")
  timing = "; ".join(
      f"{r['model']} b{r['batch']} {r['dtype']}: {r['rounds']} rounds of "
      f"{r.get('block', 1)} step(s)" for r in report["rows"])
  lines.append("Timing: medians over rounds; each round runs a block of "
               "consecutive steps of every JAX implementation (rotating "
               "order; in a block of more than one, its first step is not "
               "counted), then PyTorch is timed the same way on its own "
               f"(its spinning OpenMP workers slowed the JAX steps next to "
               f"it). {timing}.")
  lines.append("")
  lines.append("Peak RSS is the process's resident set while that "
               "implementation ran (the process also holds what earlier "
               "phases allocated); device peak is the allocator's peak.")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
