"""Where the runner's steps run: devices, processes, and moving data there.

The runner trains data-parallel over every device it is given (default: all
devices of all processes), in one of two ways around the same step:

* ``jit`` (default, the path JAX recommends): a 1-D ``data`` mesh, the state
  replicated, each batch sharded along its rows (:mod:`arl_jax.parallel`);
  XLA inserts the all-reduces. Works across processes (hosts).
* ``pmap``: the step built with ``axis_name``, the state replicated with a
  leading device axis; single process only.

The *global* batch (``config.batch_size`` rows) is split over the devices;
ARL's statistics are sums, so the coefficients are those of the global batch.
With several processes, process ``i`` feeds rows ``[i L, (i + 1) L)`` of every
global batch (``L = batch_size / process_count``): in-memory data sets take
that slice of the same global batch (an index split), the audio-visual
pipeline reads only those records.

Evaluation runs the same way and counts every row once: batches are padded to
a multiple of the device count with ``mask`` False, and per-row outputs are
gathered from all processes in row order.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from arl_jax import parallel

MODES = ("jit", "pmap")


class TopologyError(ValueError):
  """A device or process configuration the runner cannot use."""


def barrier(name: str) -> None:
  """Waits for every process (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _give_up(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(2)


def initialize(coordinator: str | None, num_processes: int | None,
               process_id: int | None, timeout_s: int = 120) -> None:
  """``jax.distributed.initialize`` with bounded waiting and clear errors.

  ``coordinator``: ``host:port`` of process 0, or ``"auto"`` for JAX's
  cluster detection (TPU pods, SLURM, Kubernetes, MPI); None: one process.
  A process count or id that the other processes do not share fails within
  ``timeout_s`` seconds with a message, instead of waiting forever.
  """
  if coordinator is None:
    return
  # CPU collectives across processes (tests, CPU clusters); GPUs and TPUs
  # use their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator == "auto":
    jax.distributed.initialize(initialization_timeout=timeout_s)
  else:
    if num_processes is None or process_id is None:
      raise TopologyError("--coordinator needs --num_processes and "
                          "--process_id (the same count on every host, a "
                          "different id on each).")
    if not 0 <= process_id < num_processes:
      raise TopologyError(f"--process_id {process_id} is not in [0, "
                          f"{num_processes}).")
    message = (
        f"process {process_id} of {num_processes} could not join the "
        f"coordinator {coordinator} within {timeout_s} s. Check that every "
        "host runs the same command with the same --num_processes and a "
        "distinct --process_id, and that process 0 is up.")
    # JAX aborts the process (a C++ check failure, no Python exception) when
    # its own deadline passes; this watchdog fires first and says why.
    watchdog = threading.Timer(timeout_s, _give_up, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    try:
      jax.distributed.initialize(coordinator_address=coordinator,
                                 num_processes=num_processes,
                                 process_id=process_id,
                                 initialization_timeout=timeout_s + 60)
    except Exception as e:   # noqa: BLE001 - re-raised with the cause
      raise TopologyError(f"{message} ({e})") from e
    finally:
      watchdog.cancel()
  if num_processes is not None and jax.process_count() != num_processes:
    raise TopologyError(f"expected {num_processes} processes; the coordinator "
                        f"reports {jax.process_count()}.")


@dataclasses.dataclass
class Topology:
  """Devices and processes of a run, and how data and state move there."""
  mode: str
  devices: list
  process_index: int
  process_count: int
  mesh: Any = None

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def is_writer(self) -> bool:
    """Process 0 writes metrics, results and plots (orbax: every process)."""
    return self.process_index == 0

  def describe(self) -> str:
    return (f"{self.mode} over {self.num_devices} "
            f"{self.devices[0].platform} device(s), {self.process_count} "
            "process(es)")

  # ----------------------------------------------------------- batches --

  def check_batch_size(self, size: int, what: str) -> None:
    if size % self.num_devices:
      raise TopologyError(
          f"{what} {size} is not divisible by the {self.num_devices} devices "
          "it is split over: choose a multiple of the device count (or "
          "config.parallel.devices).")

  def local_rows(self, size: int) -> slice:
    """This process's rows of a global batch of ``size`` rows."""
    per = size // self.process_count
    return slice(self.process_index * per, (self.process_index + 1) * per)

  def local_part(self, batch: Any) -> Any:
    """This process's rows of a global batch (every process has all of it)."""
    if self.process_count == 1:
      return batch
    return jax.tree.map(
        lambda x: np.asarray(x)[self.local_rows(np.shape(x)[0])], batch)

  def put_batch(self, local_batch: Any) -> Any:
    if self.mode == "pmap":
      return parallel.shard_batch(local_batch, self.num_devices)
    return parallel.global_batch(local_batch, self.mesh)

  # ------------------------------------------------------------- state --

  def put_state(self, state: Any) -> Any:
    if self.mode == "pmap":
      return parallel.replicate(state, self.devices, "batch")
    return parallel.replicate_on_mesh(state, self.mesh)

  def checkpointable(self, state: Any) -> Any:
    """The state as checkpointed: global arrays (jit), one replica (pmap)."""
    return parallel.unreplicate(state) if self.mode == "pmap" else state

  def from_checkpoint(self, state: Any) -> Any:
    return self.put_state(state) if self.mode == "pmap" else state

  def to_numpy(self, tree: Any) -> Any:
    """Host copy keeping every axis (a pmap tree keeps its device axis)."""
    if self.process_count == 1:
      return jax.device_get(tree)
    return jax.device_get(parallel.fetch(tree))

  def host(self, tree: Any) -> Any:
    """Host copy of replicated arrays (a pmap tree: its first replica)."""
    if self.mode == "pmap":
      tree = parallel.unreplicate(tree)
    return jax.device_get(parallel.fetch(tree))

  # ------------------------------------------------------------- steps --

  def train_step(self, make_step: Callable[..., Callable]) -> Callable:
    """``make_step(axis_name)`` -> the compiled, data-parallel step."""
    if self.mode == "pmap":
      return parallel.pmap_train_step(make_step("batch"), "batch",
                                      self.devices)
    return parallel.jit_train_step(make_step(None), self.mesh)

  def eval_step(self, eval_step: Callable | None = None, *,
                make_step: Callable[[Any], Callable] | None = None
                ) -> Callable:
    """A data-parallel ``eval_step(state, local_batch, **kw) -> host dict``.

    Give the step itself, or ``make_step(axis_name)`` (like
    :meth:`train_step`) for a step that reduces over the device axis under
    ``pmap`` (MLA's batch-level gates). Batch sums are summed over devices
    (pmap) or come out replicated (jit); per-row outputs come back for the
    whole global batch in row order.
    """
    if (eval_step is None) == (make_step is None):
      raise ValueError("give eval_step or make_step, not both.")
    if eval_step is None:
      eval_step = make_step("batch" if self.mode == "pmap" else None)
    if self.mode == "pmap":
      def per_device(state, batch, fusion_weights):
        return eval_step(state, batch, fusion_weights=fusion_weights)
      pstep = jax.pmap(per_device, axis_name="batch", devices=self.devices,
                       in_axes=(0, 0, None))

      def run(state, local_batch, fusion_weights=None):
        out = jax.device_get(pstep(state, self.put_batch(local_batch),
                                   fusion_weights))
        return jax.tree.map(
            lambda x: (x.sum(0) if x.ndim == 1 else
                       x.reshape((-1,) + x.shape[2:])), out)
      return run

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    replicated = NamedSharding(self.mesh, P())
    sharded = NamedSharding(self.mesh, P(parallel.DATA_AXIS))
    jstep = jax.jit(eval_step, in_shardings=(replicated, sharded, replicated))

    def run(state, local_batch, fusion_weights=None):
      out = jstep(state, self.put_batch(local_batch), fusion_weights)
      return jax.tree.map(self._gather, out)
    return run

  # ------------------------------------------------------------- seeds --
  # Several seeds in one program (config.num_seeds): the state stacked on a
  # leading seed axis, replicated on every device (each device holds every
  # seed's parameters: small models, and no communication between seeds);
  # the batch [seeds, rows, ...] sharded along its rows, as one seed's.

  def seeds_train_step(self, train_step: Callable, program: str = "vmap"
                       ) -> Callable:
    """A step (``axis_name=None``) over the seed axis, as one program:
    ``"vmap"`` batches the seeds into every operation; ``"map"`` runs them
    one after the other inside the program (``lax.map``: the plain step's
    operations, e.g. convolutions, which vmap turns into grouped ones)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    replicated = NamedSharding(self.mesh, P())
    rows = NamedSharding(self.mesh, P(None, parallel.DATA_AXIS))
    return jax.jit(over_seeds(train_step, program),
                   in_shardings=(replicated, rows),
                   out_shardings=(replicated, replicated), donate_argnums=0)

  def put_seed_batch(self, local_batch: Any) -> Any:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    rows = NamedSharding(self.mesh, P(None, parallel.DATA_AXIS))
    if self.process_count == 1:      # the whole batch is here: one copy
      return jax.device_put(local_batch, rows)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(rows, np.asarray(x)),
        local_batch)

  def seeds_eval_step(self, eval_step: Callable, program: str = "vmap"
                      ) -> Callable:
    """Every seed's evaluation of one batch (the same rows for all):
    ``run(state, local_batch) -> host dict`` with a leading seed axis."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    replicated = NamedSharding(self.mesh, P())
    sharded = NamedSharding(self.mesh, P(parallel.DATA_AXIS))

    def every_seed(state, batch):
      one = lambda st: eval_step(st, batch)
      if program == "vmap":
        return jax.vmap(one)(state)
      return jax.lax.map(one, state)
    jstep = jax.jit(every_seed, in_shardings=(replicated, sharded))

    def run(state, local_batch):
      out = jstep(state, self.put_batch(local_batch))
      return jax.tree.map(self._gather, out)
    return run

  def _gather(self, x: jax.Array) -> np.ndarray:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    if self.process_count == 1:
      return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


SEED_PROGRAMS = ("vmap", "map")


def over_seeds(step: Callable, program: str = "vmap") -> Callable:
  """``step(state, batch)`` over a leading seed axis of both, as one
  program: ``"vmap"`` (batched) or ``"map"`` (sequential, ``lax.map``)."""
  if program == "vmap":
    return jax.vmap(step)
  if program == "map":
    return lambda state, batch: jax.lax.map(lambda a: step(*a),
                                            (state, batch))
  raise ValueError(f"program must be one of {list(SEED_PROGRAMS)}; got "
                   f"{program!r}.")


def make_topology(mode: str, devices: int) -> Topology:
  """The run's topology: ``devices`` = 0 for all, else the first N (local)."""
  if mode not in MODES:
    raise TopologyError(f"config.parallel.mode must be one of {list(MODES)}; "
                        f"got {mode!r}.")
  processes = jax.process_count()
  if processes > 1 and mode == "pmap":
    raise TopologyError("config.parallel.mode='pmap' runs in one process; "
                        "use 'jit' across processes (hosts).")
  if devices < 0:
    raise TopologyError(f"config.parallel.devices must be >= 0 (0: all); got "
                        f"{devices}.")
  if processes > 1:
    if devices not in (0, jax.device_count()):
      raise TopologyError("with several processes the run uses every device "
                          f"(config.parallel.devices=0); got {devices}.")
    chosen = list(jax.devices())
  else:
    local = jax.local_devices()
    if devices > len(local):
      raise TopologyError(f"config.parallel.devices={devices} but this "
                          f"process has {len(local)} devices.")
    chosen = local[:devices] if devices else local
  mesh = parallel.data_mesh(chosen) if mode == "jit" else None
  return Topology(mode=mode, devices=chosen, process_index=jax.process_index(),
                  process_count=processes, mesh=mesh)
