"""Data parallelism around the one train step: ``pmap`` and ``jit`` + shardings.

Neither wrapper copies the step; both run :func:`arl_jax.make_train_step`'s
function over the *global* batch:

* :func:`pmap_train_step`: replicated state with a leading device axis, the
  batch split into per-device shards. The step must be built with
  ``axis_name=`` the same name: it then sums gradients, ARL's statistics
  (entropy sums, true-class probability sums, counts) and metrics over the
  devices, so every device computes the same coefficients, those of the
  global batch.
* :func:`jit_train_step`: ``jax.jit`` with the batch sharded along the mesh's
  ``data`` axis and the state replicated (the path JAX recommends). The step
  is built with ``axis_name=None``: XLA's partitioner inserts the
  all-reduces itself, and every reduction in the step, BatchNorm statistics
  included, is over the global batch.

BatchNorm: with ``jit_train_step`` batch statistics are always global. With
``pmap`` they are per device unless the model's BatchNorm layers get the same
``axis_name`` (``MLPEncoder(batch_norm_axis_name=...)``, or Flax's
``nn.BatchNorm(axis_name=...)``); the running averages are averaged over the
devices after every step either way, so the replicas never drift apart.

Several processes (hosts): call ``jax.distributed.initialize`` first, build
the mesh over ``jax.devices()`` (all processes' devices) and let each process
pass its own part of the global batch to :func:`global_batch`.
"""

from arl_jax._src.parallel import DATA_AXIS
from arl_jax._src.parallel import data_mesh
from arl_jax._src.parallel import fetch
from arl_jax._src.parallel import global_batch
from arl_jax._src.parallel import jit_train_step
from arl_jax._src.parallel import pmap_train_step
from arl_jax._src.parallel import replicate
from arl_jax._src.parallel import replicate_on_mesh
from arl_jax._src.parallel import shard_batch
from arl_jax._src.parallel import unreplicate

__all__ = [
    "DATA_AXIS",
    "data_mesh",
    "fetch",
    "global_batch",
    "jit_train_step",
    "pmap_train_step",
    "replicate",
    "replicate_on_mesh",
    "shard_batch",
    "unreplicate",
]
