"""Device plumbing: the pmap axis, replicating the state, sharding and prefetching batches.

Steps are written for one device and pmapped over `AXIS`; a host batch [B, ...] becomes
[devices, B / devices, ...] on its way to the devices, and the train state is one copy
per device, stacked on a leading axis.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcls import distributed
from jaxcls.config import ConfigError

AXIS = "batch"  # The one pmap axis: gradients, batch-norm statistics and eval sums.


class BatchSizeError(ConfigError):
  """The batch cannot be split evenly over the devices."""


def check_batch_divides(batch_size: int, num_devices: int) -> None:
  """Raises BatchSizeError naming the nearest valid batch sizes."""
  if batch_size % num_devices:
    lower = batch_size // num_devices * num_devices
    raise BatchSizeError(
        f"batch_size={batch_size} does not divide by the {num_devices} devices in use. "
        f"Use a multiple of {num_devices}, e.g. --config.batch_size="
        f"{max(lower, num_devices)} or {lower + num_devices}.")


def device_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
  """Leading axis split over `devices`: the layout pmap takes and returns."""
  return NamedSharding(Mesh(np.asarray(devices), (AXIS,)), PartitionSpec(AXIS))


def shard(batch: dict, num_devices: int) -> dict:
  """[B, ...] → [num_devices, B / num_devices, ...]."""
  return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
  """One copy of every array per device, stacked on a leading axis, as pmap takes it.

  Stacked on the host: stacking with jnp would compile one small program per shape.
  Typed random keys (`jax.random.key`) are replicated as keys of the same kind.
  """
  sharding = device_sharding(devices)

  def stacked(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = stacked(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding)
  return jax.tree.map(stacked, tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of each array of a pmapped result, as host arrays.

  Reads the first addressable shard directly: indexing the global array would compile a
  slice per shape, and flax.jax_utils.unreplicate returns [1, ...] arrays when pmap ran
  on one device of several.
  """
  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_shards[0].data)[0]
    return np.asarray(x)[0]
  return jax.tree.map(first, tree)


def pmap(fn: Callable, devices: Sequence[jax.Device], **kwargs) -> Callable:
  """`jax.pmap(fn)` over `devices` (all processes' devices in a multi-process run)."""
  return jax.pmap(fn, axis_name=AXIS, devices=distributed.pmap_devices(devices), **kwargs)


def prefetch_to_devices(batches: Iterator[dict], devices: Sequence[jax.Device],
                        size: int = 2) -> Iterator[dict]:
  """Shards host batches over `devices` and keeps `size` of them in flight."""
  queue = collections.deque()
  sharding = device_sharding(devices)

  def put(batch):
    return jax.device_put(shard(batch, len(devices)), sharding)

  for batch in itertools.islice(batches, size):
    queue.append(put(batch))
  for batch in batches:
    queue.append(put(batch))
    yield queue.popleft()
  while queue:
    yield queue.popleft()
