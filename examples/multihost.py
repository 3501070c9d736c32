"""One training run over several processes (one per host), on JAX's distributed runtime.

Every process runs ``train.py`` with the same flags; :func:`initialize` joins
them with ``jax.distributed.initialize`` before JAX starts, after which
``jax.devices()`` lists every process's devices and one ``--mesh`` spans them
all. Values not given as flags are detected by JAX from the launcher's
environment (SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``...); a launch that
looks multi-process but was not asked to run distributed is refused
(:func:`undeclared_launch`) rather than trained N times over.

The coordination service watches the processes' heartbeats: when one dies,
JAX ends the others ("Terminating process because the JAX distributed service
detected fatal errors. This most likely indicates that another task died")
within ``heartbeat_timeout`` seconds instead of leaving them blocked in a
collective.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

def undeclared_launch(env: Mapping[str, str] = os.environ) -> str | None:
  """What in ``env`` says this is one of several processes (``"SLURM_NTASKS=4"``), else None.

  Looks where JAX's cluster detection looks: an ``srun`` step (SLURM), an
  ``mpirun`` (Open MPI), or a coordinator address.
  """
  counts = {"SLURM_NTASKS": "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE": "OMPI_COMM_WORLD_RANK"}
  for count, beside in counts.items():
    if beside in env and env.get(count, "1").strip() not in ("", "1"):
      return f"{count}={env[count]}"
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}"
  return None


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, heartbeat_timeout: int) -> str:
  """``jax.distributed.initialize`` with these values (None: detected by JAX); a one-line report.

  Must run before anything starts JAX's backend. Raises ValueError naming the
  flags when JAX finds neither them nor a cluster environment.
  """
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout)
  except ValueError as err:  # "coordinator_address should be defined." and the like
    raise ValueError(
        f"--distributed: {err} Give --coordinator-address HOST:PORT, --num-processes and "
        "--process-id, or launch under a scheduler JAX detects (SLURM, Open MPI; "
        "JAX_COORDINATOR_ADDRESS for the address).") from None
  return (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} "
          f"of {jax.device_count()} {jax.default_backend()} devices")


def is_primary() -> bool:
  """Whether this process logs, writes files other than checkpoints and holds the run lock."""
  return jax.process_index() == 0


def largest(value: int) -> int:
  """The largest of ``value`` over all processes (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def barrier(name: str) -> None:
  """Wait until every process got here (a no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
