"""Runs of :mod:`experiments.data_parallel`'s problem the tests compare: one
device, pmap, and jit with shardings with its traces counted."""

from __future__ import annotations

import jax

from arl_jax import parallel
from experiments import data_parallel as dp


def run_single(steps: int):
  state, step = dp.build()
  step = jax.jit(step)
  batch = dp.problem()
  for t in range(steps):
    state, metrics = step(state, batch(t))
  return jax.device_get(dp.result_of(state, metrics))


def _counting(traces: list):
  """Wraps a step so that each trace (compilation) appends to ``traces``."""
  def wrap(step):
    def counted(state, batch):
      traces.append(1)             # runs only when the step is traced
      return step(state, batch)
    return counted
  return wrap


def run_pmap(steps: int, devices=None):
  """(result, (per-device ``a`` of the last step, traces))."""
  devices = devices or jax.local_devices()
  state, step = dp.build(axis_name="batch", bn_axis_name="batch")
  traces = []
  pstep = parallel.pmap_train_step(_counting(traces)(step), "batch", devices)
  state = parallel.replicate(state, devices, "batch")
  batch = dp.problem()
  for t in range(steps):
    state, metrics = pstep(state, parallel.shard_batch(batch(t), len(devices)))
  per_device = jax.device_get(metrics["a"])
  return jax.device_get(dp.result_of(parallel.unreplicate(state),
                                     parallel.unreplicate(metrics))), (
                                         per_device, len(traces))


def run_jit(steps: int, devices=None):
  """(result, traces) of :func:`experiments.data_parallel.run_jit`."""
  traces = []
  result = dp.run_jit(steps, devices, wrap_step=_counting(traces))
  return result, len(traces)


def run_steps(state, step, batches, mode: str, devices):
  """``step`` (built with ``axis_name="batch"`` for pmap, None for jit) over
  ``batches`` on ``devices``; the final state and metrics on the host."""
  n = len(devices)
  if mode == "pmap":
    pstep = parallel.pmap_train_step(step, "batch", devices)
    state = parallel.replicate(state, devices, "batch")
    for b in batches:
      state, metrics = pstep(state, parallel.shard_batch(b, n))
    return parallel.unreplicate(state), parallel.unreplicate(metrics)
  mesh = parallel.data_mesh(devices)
  jstep = parallel.jit_train_step(step, mesh)
  state = parallel.replicate_on_mesh(state, mesh)
  for b in batches:
    state, metrics = jstep(state, parallel.global_batch(b, mesh))
  return parallel.fetch((state, metrics))
