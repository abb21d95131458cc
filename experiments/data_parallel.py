"""The ARL train step with jit and shardings, in one or several processes.

One fixed problem (three modalities, MLP encoders with BatchNorm, a global
batch of 64, a few SGD steps) trained data-parallel; the final parameters,
BatchNorm statistics and metrics are what the tests compare with one device
and with pmap (tests/parallel_runs.py).

Local multi-process run (2 processes x 4 faked CPU devices, gloo collectives,
coordinator on 127.0.0.1)::

  python -m experiments.data_parallel --processes 2 --devices-per-process 4

On real hosts run the worker once per host with the same coordinator address
(see README, "Several devices and hosts").
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

MODALITIES = {"audio": 12, "visual": 20, "text": 8}
NUM_CLASSES = 5
GLOBAL_BATCH = 64


def problem(seed: int = 0):
  """Deterministic global batches: {"inputs", "labels"} per step."""
  rng = np.random.default_rng(seed)
  means = {m: rng.normal(size=(NUM_CLASSES, d)) for m, d in MODALITIES.items()}

  def batch(step):
    r = np.random.default_rng([seed, step])
    y = r.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
    x = {m: (means[m][y] + (1.0 + i) * r.normal(size=(GLOBAL_BATCH, d)))
         .astype(np.float32) for i, (m, d) in enumerate(MODALITIES.items())}
    return {"inputs": x, "labels": y}

  return batch


def build(axis_name=None, bn_axis_name=None, warmup_steps=1):
  """Model, initial state and the (unwrapped) ARL train step."""
  import jax
  import optax

  import arl_jax
  from arl_jax import models
  names = tuple(MODALITIES)
  model = models.MultimodalClassifier(
      encoders={m: models.MLPEncoder((16,), input_dim=d, batch_norm=True,
                                     batch_norm_axis_name=bn_axis_name)
                for m, d in MODALITIES.items()},
      head=models.ConcatFusion(NUM_CLASSES, names))
  example = {m: np.zeros((2, d), np.float32) for m, d in MODALITIES.items()}
  params, model_state = models.init_model(model, jax.random.PRNGKey(0), example)
  tx = optax.chain(
      arl_jax.scale_by_modality(functools.partial(models.modality_labels,
                                                  modalities=names)),
      optax.clip_by_global_norm(40.0), optax.add_decayed_weights(1e-4),
      optax.sgd(0.05, momentum=0.9))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    model_state=model_state,
                                    rng=jax.random.PRNGKey(1))
  step = arl_jax.make_train_step(models.make_apply_fn(model), tx,
                                 arl_jax.ARL(temperature=4.0, gamma=4.0),
                                 warmup_steps=warmup_steps, axis_name=axis_name)
  return state, step


def result_of(state, metrics):
  """What a run returns: final parameters, BatchNorm statistics, metrics."""
  return {"params": state.params, "model_state": state.model_state,
          "metrics": metrics}


def run_jit(steps: int, devices=None, process_rows=None, wrap_step=None):
  """jit + NamedSharding over ``devices`` (default: all, every process).

  ``process_rows``: this process's rows of each global batch (default: all);
  ``wrap_step``: applied to the train step before it is jitted (the tests
  count its traces).
  """
  import jax

  from arl_jax import parallel
  mesh = parallel.data_mesh(devices)
  state, step = build()
  if wrap_step is not None:
    step = wrap_step(step)
  jstep = parallel.jit_train_step(step, mesh)
  state = parallel.replicate_on_mesh(state, mesh)
  batch = problem()
  rows = process_rows or slice(None)
  for t in range(steps):
    local = jax.tree.map(lambda x: x[rows], batch(t))
    state, metrics = jstep(state, parallel.global_batch(local, mesh))
  return parallel.fetch(result_of(state, metrics))


# ------------------------------------------------------------ multi-process --

def worker(args):
  """One process of a multi-process run (started by `launch`)."""
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.coordinator in (None, "auto"):
    jax.distributed.initialize()  # TPU pods, SLURM, ...: detected by JAX
  else:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.processes,
                               process_id=args.process_id,
                               initialization_timeout=120)
  try:
    if args.process_id == args.fail_process:
      raise RuntimeError(f"process {args.process_id} fails on purpose")
    local = GLOBAL_BATCH // args.processes
    rows = slice(args.process_id * local, (args.process_id + 1) * local)
    result = run_jit(args.steps, process_rows=rows)
    print(f"process {args.process_id}: {jax.process_count()} processes, "
          f"{jax.device_count()} devices ({jax.local_device_count()} local), "
          f"loss {float(result['metrics']['loss']):.4f}, a = "
          + ", ".join(f"{m} {float(v):.4f}"
                      for m, v in result["metrics"]["a"].items()), flush=True)
    if args.out:
      import pickle
      path = pathlib.Path(args.out) / f"process{args.process_id}.pkl"
      path.write_bytes(pickle.dumps(result))
  except BaseException:
    # A clean shutdown would wait for the other processes at a barrier they
    # may never reach: report and leave at once; the launcher stops the rest.
    import traceback
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(processes: int, devices_per_process: int, steps: int,
           out: str | None = None, timeout: float = 300.0,
           fail_process: int = -1) -> list[str]:
  """Starts ``processes`` workers on loopback and waits for all of them.

  If any worker fails or the timeout passes, the others are terminated
  (then killed) before this raises, so no process is left behind.
  """
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={devices_per_process}")
  env["JAX_PLATFORMS"] = "cpu"
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  procs = []
  logs = [tempfile.TemporaryFile(mode="w+") for _ in range(processes)]
  for i in range(processes):
    cmd = [sys.executable, "-m", "experiments.data_parallel", "--worker",
           "--coordinator", coordinator, "--processes", str(processes),
           "--process-id", str(i), "--steps", str(steps),
           "--fail-process", str(fail_process)]
    if out:
      cmd += ["--out", out]
    procs.append(subprocess.Popen(cmd, env=env, stdout=logs[i],
                                  stderr=subprocess.STDOUT, cwd=root))
  deadline = time.monotonic() + timeout
  failed = None
  try:
    while any(p.poll() is None for p in procs):
      bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if bad:
        failed = f"process {bad[0]} exited with {procs[bad[0]].returncode}"
        break
      if time.monotonic() > deadline:
        failed = f"timed out after {timeout:.0f} s"
        break
      time.sleep(0.1)
    bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
    if bad and failed is None:
      failed = f"process {bad[0]} exited with {procs[bad[0]].returncode}"
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    for p in procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
  outputs = []
  for f in logs:
    f.seek(0)
    outputs.append(f.read())
    f.close()
  if failed:
    raise RuntimeError(f"multi-process run failed: {failed}\n" + "\n".join(
        f"--- process {i} ---\n{o}" for i, o in enumerate(outputs)))
  return outputs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=4)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", default=None, help="host:port of "
                      "process 0 (worker mode)")
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--fail-process", type=int, default=-1,
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args)
    return
  for text in launch(args.processes, args.devices_per_process, args.steps,
                     args.out):
    print(text.strip())


if __name__ == "__main__":
  main()
