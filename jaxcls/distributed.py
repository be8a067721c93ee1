"""Joining JAX's distributed runtime when a run spans several processes or hosts.

Every process runs the same command. `jax.distributed.initialize` connects them through
a coordinator (process 0) before JAX touches a device; afterwards `jax.devices()` lists
the devices of every process, `jax.local_devices()` this process's own, and a pmapped
`lax.pmean`/`lax.psum` spans all of them. On CPU the collectives go over gloo (TCP).

Whether to initialize is decided once, at start-up, from flags or the environment:
- explicit `--coordinator-address`, `--num-processes`, `--process-id` (any one of them);
- JAX_COORDINATOR_ADDRESS in the environment (JAX reads it itself);
- a cluster JAX can describe itself: a SLURM job step with more than one task, an Open
  MPI job with more than one rank, or a multi-host TPU slice whose worker list is in the
  environment (GKE). On a Compute Engine TPU slice the worker list lives in the metadata
  server instead, so pass `--distributed=on` there (JAX then reads it).
A plain run on one machine matches none of these and never starts the runtime.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, Sequence, TypeVar

import jax
import numpy as np

from jaxcls.errors import JaxclsError

T = TypeVar("T")

MODES = ("auto", "on", "off")

log = logging.getLogger("jaxcls")


class DistributedError(JaxclsError, ValueError):
  """The distributed flags are inconsistent; says which and how to fix them."""


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def cluster_detected() -> str | None:
  """The name of a multi-process cluster environment JAX can auto-detect, or None."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(v in os.environ for v in slurm) and _int_env("SLURM_NTASKS") > 1:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in os.environ and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  workers = (os.environ.get("TPU_PROCESS_ADDRESSES")
             or os.environ.get("TPU_WORKER_HOSTNAMES") or "")
  if "," in workers or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU slice"
  return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime if the flags or the environment ask for it.

  Must run before anything creates a JAX array or asks for devices. Returns True when
  the runtime was started; afterwards `jax.process_count()` counts every process.
  """
  if mode not in MODES:
    raise DistributedError(f"--distributed={mode!r}; use one of {', '.join(MODES)}.")
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if mode == "off":
    if given:
      raise DistributedError(
          f"--distributed=off but "
          f"{', '.join('--' + k.replace('_', '-') for k in given)} given. Drop "
          "them, or use --distributed=auto to start the distributed runtime.")
    return False
  _check_explicit(num_processes, process_id)
  source = "flags" if given else cluster_detected()
  if mode == "auto" and source is None:
    return False
  log.info("Starting JAX's distributed runtime (from %s).", source or "auto-detection")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except ValueError as e:  # JAX could not work out what was not given.
    raise DistributedError(
        f"Cannot start JAX's distributed runtime: {e} Pass --coordinator-address="
        "HOST0:PORT --num-processes=N --process-id=I on every process, or drop "
        "--distributed=on for a single-process run.") from None
  log.info("Process %d of %d: %d local and %d global devices.", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _check_explicit(num_processes: int | None, process_id: int | None) -> None:
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f"--num-processes={num_processes}; use 1 or more (the number "
                           "of processes started, one per host or per GPU).")
  if process_id is not None and (process_id < 0 or (
      num_processes is not None and process_id >= num_processes)):
    raise DistributedError(
        f"--process-id={process_id} with --num-processes={num_processes}; give each "
        "process a different id from 0 to num_processes - 1 (0 runs the coordinator).")


def is_main_process() -> bool:
  """True on the one process that writes logs, metrics and reports."""
  return jax.process_index() == 0


def pmap_devices(devices: Sequence[jax.Device]) -> Sequence[jax.Device] | None:
  """The `devices` argument for `jax.pmap`: None when several processes run.

  Across processes pmap must map over every process's devices, or its collectives stay
  inside each process and P separate models train without a word; with devices=None it
  maps over each process's local devices and psum/pmean span them all.
  """
  if jax.process_count() == 1:
    return devices
  if set(devices) != set(jax.local_devices()):
    raise DistributedError(
        f"With {jax.process_count()} processes every process must use all of its "
        f"{jax.local_device_count()} local devices, not {len(devices)}. Limit a host's "
        "devices with CUDA_VISIBLE_DEVICES (or JAX_LOCAL_DEVICE_IDS) instead.")
  return None


def on_main_process_first(build: Callable[[], T]) -> T:
  """Runs `build` on process 0, waits for it everywhere, then runs it on the others.

  For work that fills shared files (generated images, caches in the workdir): the other
  processes find them complete instead of writing the same files at the same time.
  """
  if jax.process_count() == 1:
    return build()
  from jax.experimental import multihost_utils
  result = build() if is_main_process() else None
  multihost_utils.sync_global_devices("jaxcls: process 0 done first")
  return result if is_main_process() else build()


def check_same_everywhere(make_data: Callable[[], bytes], message: str) -> None:
  """Raises DistributedError with `message` unless `make_data()` is equal everywhere.

  `make_data` is called only with several processes (a TFDS fingerprint reads every
  record).
  """
  if jax.process_count() == 1:
    return
  data = make_data()
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(data).digest(), np.int32)
  everywhere = multihost_utils.process_allgather(digest)
  if not (everywhere == digest).all():
    raise DistributedError(message)


def signal_anywhere(received: str | None, sync_point: bool) -> str | None:
  """The stop signal (e.g. "SIGTERM") to act on at this step, the same on every process.

  One process alone: its own `received`, at once. Several: only at `sync_point` steps,
  which every process reaches together, the first signal any process received; a
  process that stopped alone would leave the others waiting in a collective.
  """
  if jax.process_count() == 1:
    return received
  if not sync_point:
    return None
  from jax.experimental import multihost_utils
  names = ("", "SIGTERM", "SIGINT")
  code = np.int32(names.index(received) if received in names else (1 if received else 0))
  everywhere = np.asarray(multihost_utils.process_allgather(code)).ravel()
  return names[int(everywhere.max())] or None
