"""Data-parallel wrappers of the train step; public API: :mod:`arl_jax.parallel`."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


# ------------------------------------------------------------------- pmap --

def pmap_train_step(train_step: Callable, axis_name: str = "batch",
                    devices: Sequence[jax.Device] | None = None) -> Callable:
  """``jax.pmap`` of a step built with ``make_train_step(..., axis_name=...)``.

  The returned function takes a replicated state (:func:`replicate`) and a
  batch split by :func:`shard_batch`; its state and metrics have a leading
  device axis (all entries equal; :func:`unreplicate` takes the first).

  Raises:
    ValueError: if ``train_step`` was built by ``make_train_step`` with
      another ``axis_name`` (or none): each device would then compute its
      own coefficients and gradients from its shard, and the replicas would
      drift apart.
  """
  built_for = getattr(train_step, "axis_name", axis_name)
  if built_for != axis_name:
    raise ValueError(
        f"this train step was built with axis_name={built_for!r}, but is "
        f"mapped over the axis {axis_name!r}: each device would use the "
        "coefficients and gradients of its own shard only. Build it with "
        f"make_train_step(..., axis_name={axis_name!r}).")
  return jax.pmap(train_step, axis_name=axis_name, devices=devices,
                  donate_argnums=0)


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None,
              axis_name: str = "batch") -> Any:
  """Copies every leaf to each device, with a leading device axis (for pmap).

  Use the same ``axis_name`` as :func:`pmap_train_step`: the arrays then
  carry exactly the sharding the step returns, so the second step does not
  recompile.
  """
  devices = list(devices or jax.local_devices())
  leaves, treedef = jax.tree.flatten(tree)
  impls = [_key_impl(x) for x in leaves]
  stacked = [np.broadcast_to(np.asarray(_raw(x)), (len(devices),) + np.shape(
      _raw(x))) for x in leaves]

  def rewrap(raw):     # typed PRNG keys travel as their data, rewrapped here
    return [x if i is None else jax.random.wrap_key_data(x, impl=i)
            for x, i in zip(raw, impls)]

  out = jax.pmap(rewrap, axis_name=axis_name, devices=devices)(stacked)
  return jax.tree.unflatten(treedef, out)


def _key_impl(x: Any):
  """The PRNG implementation of a typed key array (``jax.random.key``), else
  None (NumPy cannot hold typed keys: they travel as their key data)."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key):
    return jax.random.key_impl(x)
  return None


def _raw(x: Any) -> Any:
  return x if _key_impl(x) is None else jax.random.key_data(x)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated pytree."""
  return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch: Any, num_devices: int | None = None) -> Any:
  """Reshapes every leaf ``[B, ...]`` to ``[num_devices, B / num_devices, ...]``."""
  n = num_devices or jax.local_device_count()

  def split(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by the "
                       f"{n} devices.")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree.map(split, batch)


# ---------------------------------------------------------- jit + sharding --

def data_mesh(devices: Sequence[jax.Device] | None = None,
              axis: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process)."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), (axis,))


def jit_train_step(train_step: Callable, mesh: Mesh, axis: str = DATA_AXIS
                   ) -> Callable:
  """``jax.jit`` of a step (built with ``axis_name=None``) over ``mesh``.

  State replicated, batch sharded along ``axis`` on its leading dimension,
  state donated. Put the inputs in place with :func:`replicate_on_mesh` and
  :func:`global_batch`.
  """
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(axis))
  return jax.jit(train_step, in_shardings=(replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def _put(x: Any, sharding: NamedSharding, global_shape=None) -> jax.Array:
  x = np.asarray(x)
  shape = x.shape if global_shape is None else global_shape
  return jax.make_array_from_callback(shape, sharding, lambda idx: x[idx])


def replicate_on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (the same on every process) replicated over ``mesh``.

  Typed PRNG keys (``jax.random.key``) are placed as their key data and
  rewrapped, so they stay typed keys.
  """
  sharding = NamedSharding(mesh, P())

  def place(x):
    impl = _key_impl(x)
    if impl is None:
      return _put(x, sharding)
    return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding),
                                    impl=impl)

  return jax.tree.map(place, tree)


def global_batch(local_batch: Any, mesh: Mesh, axis: str = DATA_AXIS) -> Any:
  """Builds the global sharded batch from this process's part of it.

  With one process ``local_batch`` is the whole batch. With several, each
  process passes its own contiguous rows (process ``i`` holds rows ``i * B_local
  ... (i + 1) * B_local - 1`` of the global batch).
  """
  sharding = NamedSharding(mesh, P(axis))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def fetch(tree: Any) -> Any:
  """Host copy of replicated (possibly multi-process) arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))
                      if isinstance(x, jax.Array) else x, tree)
